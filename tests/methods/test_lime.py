import json

import pytest
import torch

from fnattr import prepare
from fnattr.methods import METHODS, lime
from fnattr.methods.lime import fit_surrogates, sample_masks
from fnattr.targets import logprob, probability
from tests.reference import _embeddings, prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"
N, SEED, WIDTH, ALPHA = 24, 7, 0.4, 0.5


def _ridge(z, y, w, alpha):
    """Weighted ridge with a free intercept, by the normal equations (independent of lstsq)."""
    x = torch.cat([torch.ones(len(z), 1, dtype=torch.float64), z], 1)
    penalty = torch.eye(x.shape[1], dtype=torch.float64) * alpha
    penalty[0, 0] = 0
    coef = torch.linalg.solve(x.T @ (w[:, None] * x) + penalty, x.T @ (w * y))
    return coef[1:]


def _reference(model, batch, target_fn):
    """Per-step loop: each step draws the same masks, runs one model call per mask on its own
    prefix (tests/reference.py), and fits its surrogate over the tokens it can see."""
    src, tgt, start = batch.source_ids[0], batch.target_ids[0], batch.decoder_start_id
    unk = {side: _embeddings(model, side)(torch.tensor([batch.unk_id]))[0].detach()
           for side in ("source", "target")}
    src_pos = (~batch.source_special[0]).nonzero().squeeze(1).tolist()
    tgt_pos = (~batch.target_special[0][:-1]).nonzero().squeeze(1).tolist()
    masks = sample_masks(N, len(src_pos) + len(tgt_pos), seed=SEED)
    enc_dec = int(model.config.is_encoder_decoder)
    want_src = torch.zeros(len(tgt), len(src), dtype=torch.float64)
    want_tgt = torch.zeros(len(tgt), len(tgt), dtype=torch.float64)
    for k in range(len(tgt)):
        feats = [("s", i) for i in src_pos] + [("t", j) for j in tgt_pos if j < k]
        z = masks[:, : len(feats)].to(torch.float64)
        with torch.no_grad():
            s, p = prefix_inputs(model, src, tgt, k, start)
            y = []
            for keep in masks[:, : len(feats)]:
                s2, p2 = s.clone(), p.clone()
                for (side, i), kept in zip(feats, keep):
                    if not kept and side == "s":
                        s2[i] = unk["source"]
                    elif not kept:
                        p2[i + enc_dec] = unk["target"]
                y.append(step_score(model, s2, p2, int(tgt[k]), target_fn))
        cosine = (z.sum(1) / len(feats)).sqrt()
        w = torch.exp(-((1 - cosine) ** 2) / WIDTH**2)
        coef = _ridge(z, torch.stack(y), w, ALPHA)
        for (side, i), c in zip(feats, coef):
            (want_src if side == "s" else want_tgt)[k, i] = c
    return want_src, want_tgt


def test_one_forward_per_mask_equals_per_step_fits(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = lime(model, batch, logprob, n_samples=N, seed=SEED, kernel_width=WIDTH, alpha=ALPHA,
               attribute_target=True)
    want_src, want_tgt = _reference(model, batch, logprob)
    assert out.extra_dims == () and out.source.shape == (1, *want_src.shape)
    torch.testing.assert_close(out.source[0], want_src, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(out.target[0], want_tgt, rtol=1e-7, atol=1e-10)
    assert (out.source != 0).sum() > out.source.shape[1] and (out.target != 0).any()
    assert torch.all(out.target[0].triu() == 0)  # tokens a step cannot see score exactly 0


def test_surrogate_recovers_an_exact_linear_function():
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(40, 5, generator=gen) < 0.5).to(torch.float64)
    beta = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    y = 0.25 + z @ beta
    w = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    visible = torch.tensor([1, 1, 1, 1, 0], dtype=torch.float64)  # the last one is not an input
    coef = fit_surrogates(z, y - z[:, 4] * 3.0, w, visible, 0.0)
    torch.testing.assert_close(coef, beta * visible, rtol=0, atol=1e-12)
    assert coef[4] == 0


def test_seeded_reproducible_and_seed_matters(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    a, b = (lime(model, batch, n_samples=20, seed=3) for _ in range(2))
    c = lime(model, batch, n_samples=20, seed=4)
    assert torch.equal(a.source, b.source) and torch.equal(a.target, b.target)
    assert not torch.allclose(a.source, c.source)
    drawn = lime(model, batch, n_samples=20)  # seed=None: drawn, recorded, replayable
    seed = json.loads(drawn.meta["args"])["seed"]
    assert torch.equal(drawn.source, lime(model, batch, n_samples=20, seed=seed).source)


def test_batched_and_chunked_equal_single(any_model):
    model, tok = any_model
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    targets = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, targets)
    kw = {"n_samples": 16, "seed": 1, "attribute_target": True}
    out = lime(model, batch, internal_batch_size=7, **kw)
    chunk1 = lime(model, batch, internal_batch_size=1, **kw)
    torch.testing.assert_close(out.source, chunk1.source, rtol=1e-8, atol=1e-12)
    for i in range(len(sources)):
        one = lime(model, prepare(model, tok, sources[i], targets[i]), **kw)
        n_tgt, cols = one.target_ids.shape[1], batch.source_mask[i]
        torch.testing.assert_close(out.source[i, :n_tgt][:, cols], one.source[0], rtol=1e-7, atol=1e-11)
        torch.testing.assert_close(out.target[i, :n_tgt, :n_tgt], one.target[0], rtol=1e-7, atol=1e-11)
        assert torch.all(out.source[i, :, ~cols] == 0)


def test_model_unchanged_also_after_an_error(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    out = lime(model, batch, n_samples=8, seed=0, step_scores=["logprob"])
    torch.testing.assert_close(out.step_scores["logprob"], out.step_scores["probability"].log())
    assert_unchanged(model, before)

    def fails_on_perturbed(logits, target_ids):
        if logits.shape[0] > 1:
            raise ArithmeticError("inside")
        return probability(logits, target_ids)

    with pytest.raises(ArithmeticError):
        lime(model, batch, fails_on_perturbed, n_samples=8)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="`n_samples`"):
        lime(model, batch, n_samples=1)
    assert METHODS["lime"] is lime


def test_a_step_alone_on_its_prefix_gives_the_same_scores(gpt2):
    """Masks are drawn feature by feature, so a per-step run on the prefix reproduces step t."""
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    full = lime(model, batch, n_samples=12, seed=5)
    ids = batch.target_ids[0].tolist()
    for t in (1, len(ids) - 1):
        prefix = prepare(model, tok, [SOURCE], [tok.decode(ids[: t + 1])])
        assert prefix.target_ids[0].tolist() == ids[: t + 1]
        one = lime(model, prefix, n_samples=12, seed=5, attr_pos_start=t)
        torch.testing.assert_close(one.source[0, 0], full.source[0, t], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(one.target[0, 0], full.target[0, t, : t + 1], rtol=1e-8, atol=1e-12)

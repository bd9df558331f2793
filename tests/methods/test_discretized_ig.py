import pytest
import torch

from fnattr import prepare
from fnattr.methods import _paths
from fnattr.methods.discretized_ig import discretized_integrated_gradients as dig
from fnattr.methods.discretized_ig import monotonic_paths
from tests.reference import _embeddings, prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot
from fnattr.targets import logprob

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _vocab(model, side):
    module = _embeddings(model, side)
    with torch.no_grad():
        return module(torch.arange(module.weight.shape[0]))


@pytest.mark.parametrize("strategy", ["greedy", "maxcount"])
def test_paths_are_monotonic_and_anchored_on_vocabulary(gpt2, strategy):
    model, tok = gpt2
    vocab = _vocab(model, "source")
    ids = torch.tensor([10, 57, 123, 200])
    x, base = vocab[ids], vocab[torch.full_like(ids, tok.unk_token_id)]
    paths, anchors = monotonic_paths(x, base, ids, vocab, n_steps=9, n_neighbors=32, strategy=strategy)
    assert paths.shape == (4, 10, vocab.shape[1]) and anchors.shape == (4, 8)
    torch.testing.assert_close(paths[:, 0], base, rtol=0, atol=0)
    torch.testing.assert_close(paths[:, -1], x, rtol=0, atol=0)
    steps = paths.diff(dim=1)  # [pos seg d]: every step moves each dim toward x, or stays
    direction = torch.sign(x - base)[:, None]
    assert torch.all(steps * direction >= 0)
    assert torch.all((steps * (direction == 0)).abs() == 0)
    assert torch.all((anchors >= 0) & (anchors < vocab.shape[0])) and not torch.any(anchors == ids[:, None])
    for p in range(4):
        assert len(set(anchors[p].tolist())) == 8  # each anchor used once
        for k in range(1, 9):  # inner point k: the anchor's own values wherever those are monotonic
            a = vocab[anchors[p, k - 1]]
            lo = torch.minimum(base[p], paths[p, k + 1])
            hi = torch.maximum(base[p], paths[p, k + 1])
            inside = (a >= lo) & (a <= hi)
            assert torch.equal(paths[p, k][inside], a[inside])
        # the anchor next to x (a neighbour of x) shares values with it (random tiny embeddings:
        # anchors near the baseline may share none, the box around the path being small there)
        assert inside.any()
    other, _ = monotonic_paths(x, base, ids, vocab, n_steps=9, n_neighbors=32,
                               strategy="maxcount" if strategy == "greedy" else "greedy")
    assert not torch.equal(other, paths)


def test_equals_per_step_on_the_same_paths(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    n_steps, q = 3, 2
    out = dig(model, batch, logprob, n_steps=n_steps, points_per_segment=q, n_neighbors=8,
              attribute_target=True, internal_batch_size=5)
    alphas, weights = _paths.quadrature("gausslegendre", q)
    lo = 1 if model.config.is_encoder_decoder else 0
    for row in range(len(batch)):
        ms, mt = batch.source_mask[row], batch.target_mask[row]
        src, tgt = batch.source_ids[row][ms], batch.target_ids[row][mt]
        sp_s, sp_t = batch.source_special[row][ms], batch.target_special[row][mt]
        T = len(tgt)
        xs, xt = prefix_inputs(model, src, tgt, T - 1, batch.decoder_start_id)
        full_t = _embeddings(model, "target")(tgt).detach()
        side_paths = []
        for side, x, ids, sp in (("source", xs, src, sp_s), ("target", full_t, tgt, sp_t)):
            vocab = _vocab(model, side)
            base = torch.where(sp[:, None], x, vocab[tok.unk_token_id])
            keep = ~sp & (x != base).any(-1)
            pth = x[:, None].expand(-1, n_steps + 1, -1).clone()
            pth[keep] = monotonic_paths(x[keep], base[keep], ids[keep], vocab, n_steps=n_steps,
                                        n_neighbors=8, strategy="greedy")[0]
            side_paths.append(pth)
        ps, pt = side_paths
        for t in range(T):
            want_s, want_t = torch.zeros_like(xs), torch.zeros(t, xs.shape[1], dtype=xs.dtype)
            for k in range(n_steps):
                for a, w in zip(alphas, weights):
                    s_pt = (ps[:, k] + a * (ps[:, k + 1] - ps[:, k])).requires_grad_()
                    t_pt = (pt[:t, k] + a * (pt[:t, k + 1] - pt[:t, k])).requires_grad_()
                    dec = torch.cat([xt[:lo], t_pt])
                    gs, gt = torch.autograd.grad(step_score(model, s_pt, dec, int(tgt[t]), logprob),
                                                 (s_pt, t_pt), allow_unused=True, materialize_grads=True)
                    want_s += w * gs * (ps[:, k + 1] - ps[:, k])
                    want_t += w * gt * (pt[:t, k + 1] - pt[:t, k])
            torch.testing.assert_close(out.source[row, t][ms], want_s, rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(out.target[row, t, :t], want_t, rtol=1e-7, atol=1e-12)


def test_delta_vanishes_with_points_per_segment(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    coarse = dig(model, batch, n_steps=6, points_per_segment=1).delta.abs().max()
    fine = dig(model, batch, n_steps=6, points_per_segment=8).delta.abs().max()
    assert fine < 1e-9 < coarse


def test_batched_unchanged_and_range(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    out = dig(model, batch, n_steps=3, strategy="maxcount")
    assert_unchanged(model, before)
    for row in range(len(batch)):
        one = dig(model, batch.select([row]), n_steps=3, strategy="maxcount")
        n_tgt = int(batch.target_mask[row].sum())
        torch.testing.assert_close(out.source[row, :n_tgt][:, batch.source_mask[row]],
                                   one.source[0, :n_tgt], rtol=1e-7, atol=1e-12)
    part = dig(model, batch, n_steps=3, strategy="maxcount", attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, out.source[:, 1:3], rtol=1e-9, atol=1e-12)
    with pytest.raises((ValueError, TypeError), match="strategy"):  # TypeError: CI's jaxtyping hook
        dig(model, batch, strategy="best")
    with pytest.raises(ValueError, match="n_steps"):
        dig(model, batch, n_steps=1)
    assert_unchanged(model, before)

import json

import pytest
import torch

from fnattr import prepare
from fnattr.methods._path import quadrature as _paths
from fnattr.methods._path.refine import ConvergenceWarning
from fnattr.methods.sequential_ig import sequential_integrated_gradients as sig
from fnattr.targets import logprob
from tests.conftest import _get
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _unk(ids, special, unk):
    return torch.where(special, ids, unk)


def _step_inputs(model, tok, batch, row, t):
    """Step t of one row, unpadded: target id, inputs and UNK baselines (source, target prefix),
    the decoder start offset and the attributed (side, position) tokens."""
    ms, mt = batch.source_mask[row], batch.target_mask[row]
    src, tgt = batch.source_ids[row][ms], batch.target_ids[row][mt]
    sp_s, sp_t = batch.source_special[row][ms], batch.target_special[row][mt]
    xs, xt = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    bs, bt = prefix_inputs(model, _unk(src, sp_s, tok.unk_token_id), _unk(tgt, sp_t, tok.unk_token_id),
                           t, batch.decoder_start_id)
    lo = 1 if model.config.is_encoder_decoder else 0  # decoder start token: not attributed
    tokens = [(0, p) for p in range(len(src)) if not sp_s[p]] + \
             [(1, j) for j in range(t) if not sp_t[j]]
    return int(tgt[t]), (xs, xt), (bs, bt), lo, tokens


def _per_step(model, tok, batch, row, t, n_steps):
    """SIG of step t on the unpadded prefix: each non-special token moved alone, plain autograd."""
    y, (xs, xt), (bs, bt), lo, tokens = _step_inputs(model, tok, batch, row, t)
    alphas, weights = _paths.quadrature("gausslegendre", n_steps)
    out = [torch.zeros_like(xs), torch.zeros_like(xt[lo:])]
    for side, p in tokens:
        x, b = (xs, bs) if side == 0 else (xt, bt)
        q = p if side == 0 else p + lo
        for a, w in zip(alphas, weights):
            emb = x.clone()
            leaf = (b[q] + a * (x[q] - b[q])).requires_grad_()
            emb[q] = leaf
            args = (emb, xt) if side == 0 else (xs, emb)
            (g,) = torch.autograd.grad(step_score(model, *args, y, logprob), leaf)
            out[side][p] += w * g * (x[q] - b[q])
    return out


def test_equals_per_step(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = sig(model, batch, logprob, n_steps=3, attribute_target=True, internal_batch_size=7)
    for row in range(len(batch)):
        for t in range(int(batch.target_mask[row].sum())):
            want_s, want_t = _per_step(model, tok, batch, row, t, 3)
            torch.testing.assert_close(out.source[row, t][batch.source_mask[row]], want_s,
                                       rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(out.target[row, t, :t], want_t, rtol=1e-7, atol=1e-12)


def test_token_sums_converge_to_single_token_differences(gpt2):
    """Each token's scores sum to f(x) - f(x with that token at its baseline)."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    out = sig(model, batch, logprob, n_steps=24)
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    t = int(batch.target_mask[0].sum()) - 1
    xs, xt = prefix_inputs(model, src, tgt, t, None)
    with torch.no_grad():
        f_x = step_score(model, xs, xt, int(tgt[t]), logprob)
        for p in range(1, len(src)):  # position 0 is <s>: kept, score 0
            moved = xs.clone()
            moved[p] = model.get_input_embeddings()(torch.tensor(tok.unk_token_id))
            want = f_x - step_score(model, moved, xt, int(tgt[t]), logprob)
            assert abs(float(out.source[0, t, p].sum() - want)) < 1e-4 * (1 + abs(float(want)))
    assert torch.all(out.source[0, :, 0] == 0)


def test_batched_unchanged_and_range(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    out = sig(model, batch, n_steps=2)
    assert_unchanged(model, before)
    assert (out.target is None) == model.config.is_encoder_decoder
    for row in range(len(batch)):
        one = sig(model, batch.select([row]), n_steps=2)
        n_tgt = int(batch.target_mask[row].sum())
        torch.testing.assert_close(out.source[row, :n_tgt][:, batch.source_mask[row]],
                                   one.source[0, :n_tgt], rtol=1e-7, atol=1e-12)
    part = sig(model, batch, n_steps=2, attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, out.source[:, 1:3], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="internal_batch_size"):
        sig(model, batch, internal_batch_size=0)
    assert_unchanged(model, before)


def _single_token_differences(model, tok, batch, row, t):
    """f_t(x) - f_t(x with token i alone at UNK) of every source token and target token before t
    (0 at special tokens), from plain forwards."""
    y, (xs, xt), (bs, bt), lo, tokens = _step_inputs(model, tok, batch, row, t)
    out = [torch.zeros(len(xs), dtype=xs.dtype), torch.zeros(t, dtype=xs.dtype)]
    with torch.no_grad():
        f_x = step_score(model, xs, xt, y, logprob)
        for side, p in tokens:
            x, b, q = (xs, bs, p) if side == 0 else (xt, bt, p + lo)
            moved = x.clone()
            moved[q] = b[q]
            out[side][p] = f_x - step_score(model, *((moved, xt) if side == 0 else (xs, moved)), y,
                                            logprob)
    return out


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_per_token_completeness_delta_and_record(request, name):
    """Token i's scores of step t sum to f_t(x) - f_t(x_{i<-b}) (plain forwards, decoder-only and
    encoder-decoder); `delta` is the sum of the per-token errors, the recorded relative error
    sum_i |err_i| / sum_i |f_t(x) - f_t(x_{i<-b})|, and both shrink with `n_steps`. "riemann_left"
    reuses its point 0 for f_t(x_{i<-b}), Gauss-Legendre runs extra forwards: both are checked."""
    model, tok = _get(request, name)
    batch = prepare(model, tok, SOURCES, TARGETS)
    runs = [sig(model, batch, logprob, n_steps=n, method=m, baseline="unk", attribute_target=True,
                attr_pos_start=2) for n, m in ((3, "riemann_left"), (8, "gausslegendre"))]
    for out in runs:
        assert not out.step_mask[0, -1]  # row 0 is the shorter: padding steps
        assert torch.all(out.delta[~out.step_mask] == 0)
    coarse_rel, fine_rel = (json.loads(o.meta["completeness"])["relative_error"] for o in runs)
    for row, k in out.step_mask.nonzero().tolist():
        t = k + 2
        want_s, want_t = _single_token_differences(model, tok, batch, row, t)
        want = torch.cat([want_s, want_t])
        errs = []
        for out, rel in zip(runs, (coarse_rel, fine_rel)):
            got = torch.cat([out.source[row, k][batch.source_mask[row]].sum(-1),
                             out.target[row, k, :t].sum(-1)])
            err = got - want
            # (f_t(x_{i<-b}) from a batched forward differs from the plain one by rounding)
            assert float(out.delta[row, k]) == pytest.approx(float(err.sum()), rel=1e-6, abs=1e-13)
            assert rel[row][k] == pytest.approx(float(err.abs().sum() / want.abs().sum()),
                                                rel=1e-6, abs=1e-10)
            errs.append(err)
        assert errs[1].abs().max() <= 1e-3 * want.abs().max()  # complete, token by token
        assert fine_rel[row][k] < 1e-2 * coarse_rel[row][k]


def test_auto_meets_tolerance_and_equals_fixed_rule(gpt2):
    """n_steps="auto" (the default): every step within the tolerance, and its scores, delta and
    relative error are those of the fixed rule with the points that step used."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    out = sig(model, batch, logprob, tolerance=1e-7, max_steps=32)
    info = json.loads(out.meta["completeness"])
    assert info["tolerance"] == 1e-7 and info["unconverged"] == []
    real = out.step_mask
    rel = torch.tensor([[v or 0.0 for v in r] for r in info["relative_error"]])
    assert (rel[real] <= 1e-7).all()
    points = torch.tensor(info["points"])
    assert len(set(points[real].tolist())) > 1 and set(points[real].tolist()) <= {8, 16, 32}
    for n in set(points[real].tolist()):
        fixed = sig(model, batch, logprob, n_steps=n)
        sel = (points == n) & real
        torch.testing.assert_close(out.source[sel], fixed.source[sel], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.target[sel], fixed.target[sel], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.delta[sel], fixed.delta[sel], rtol=1e-6, atol=1e-15)


def test_auto_names_steps_that_miss_the_cap(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    with pytest.warns(ConvergenceWarning, match=r"sequential_integrated_gradients: 4 step\(s\) missed "
                      r"\|delta\| <= 1e-10%.*row 0 step 0 ' Paris'.*row 0 step 3 ' city'"):
        out = sig(model, batch, tolerance=1e-12, max_steps=15)
    info = json.loads(out.meta["completeness"])
    assert info["unconverged"] == [[0, k] for k in range(4)] and info["points"] == [[8] * 4]


def test_fixed_n_steps_records_completeness(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    out = sig(model, batch, n_steps=1, method="riemann_right")
    info = json.loads(out.meta["completeness"])
    assert info["points"] == 1 and info["tolerance"] == 0.05
    assert info["unconverged"] == [[0, k] for k, r in enumerate(info["relative_error"][0]) if r > 0.05]
    assert info["unconverged"]  # one point is too few here
    raw = sig(model, batch, n_steps=1, method="riemann_right", multiply_by_inputs=False)
    assert raw.delta is None and raw.meta["completeness"] == out.meta["completeness"]


@pytest.mark.parametrize("options, match", [
    ({"n_steps": "many"}, "n_steps"), ({"n_steps": 0}, "n_steps"),
    ({"tolerance": 0.0}, "tolerance"), ({"max_steps": 4}, "max_steps"),
])
def test_convergence_options_errors(gpt2, options, match):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError: CI's jaxtyping hook
        sig(model, batch, **options)

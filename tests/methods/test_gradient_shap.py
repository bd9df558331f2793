import json

import pytest
import torch

from fnattr import prepare
from fnattr.methods.gradient_shap import gradient_shap, row_generator
from fnattr.methods.integrated_gradients import integrated_gradients
from fnattr.targets import logprob
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _unk(ids, special, unk):
    return torch.where(special, ids, unk)


def test_equals_per_step_with_the_documented_draws(any_model):
    """Re-draw alpha, baseline index and noise in the documented order, then compute every step
    with plain autograd on the unpadded prefix."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    n, stdevs, at = 3, 0.05, True
    out = gradient_shap(model, batch, logprob, n_samples=n, stdevs=stdevs, seed=7,
                        baseline=("unk", "zeros"), attribute_target=at, internal_batch_size=4)
    for row in range(len(batch)):
        ms, mt = batch.source_mask[row], batch.target_mask[row]
        src, tgt = batch.source_ids[row][ms], batch.target_ids[row][mt]
        sp_s, sp_t = batch.source_special[row][ms], batch.target_special[row][mt]
        gen = row_generator(7, batch, row)
        alpha = torch.rand(n, generator=gen, dtype=torch.float64)
        which = torch.randint(2, (n,), generator=gen)
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        e_s = torch.zeros(n, len(src), d, dtype=torch.float64)
        e_t = torch.zeros(n, len(tgt), d, dtype=torch.float64)
        e_s[:, ~sp_s] = torch.randn(n, int((~sp_s).sum()), d, generator=gen, dtype=torch.float64) * stdevs
        e_t[:, ~sp_t] = torch.randn(n, int((~sp_t).sum()), d, generator=gen, dtype=torch.float64) * stdevs
        for t in range(len(tgt)):
            xs, xt = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
            us, ut = prefix_inputs(model, _unk(src, sp_s, tok.unk_token_id),
                                   _unk(tgt, sp_t, tok.unk_token_id), t, batch.decoder_start_id)
            lo = 1 if model.config.is_encoder_decoder else 0  # decoder start: fixed, not attributed
            want_s, want_t, ends = 0, 0, 0
            for k in range(n):
                if which[k] == 0:
                    bs, bt = us, ut
                else:  # zeros at ordinary tokens, specials kept
                    bs = torch.where(sp_s[:, None], xs, 0)
                    bt = xt.clone()
                    bt[lo:] = torch.where(sp_t[:t, None], xt[lo:], 0)
                ds, dt = xs + e_s[k] - bs, xt.clone() - bt
                dt[lo:] = dt[lo:] + e_t[k, :t]
                ps, pt = (bs + alpha[k] * ds).requires_grad_(), (bt + alpha[k] * dt).requires_grad_()
                gs, gt = torch.autograd.grad(step_score(model, ps, pt, int(tgt[t]), logprob), (ps, pt))
                want_s = want_s + gs * ds / n
                want_t = want_t + (gt * dt)[lo:] / n
                with torch.no_grad():  # f(x + e_k) - f(b_k): this draw's path, end to end
                    ends = ends + (step_score(model, bs + ds, bt + dt, int(tgt[t]), logprob)
                                   - step_score(model, bs, bt, int(tgt[t]), logprob)) / n
            torch.testing.assert_close(out.source[row, t][ms], want_s, rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(out.target[row, t, :t], want_t, rtol=1e-7, atol=1e-12)
            # delta: sum of the scores minus the sample mean of f(x + e_s) - f(b_s)
            torch.testing.assert_close(out.delta[row, t], want_s.sum() + want_t.sum() - ends,
                                       rtol=1e-7, atol=1e-11)
    assert json.loads(out.meta["completeness"])["points"] == n


def test_seeded_reproducible_and_batch_invariant(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    kw = {"n_samples": 4, "stdevs": 0.1}
    a, b = gradient_shap(model, batch, seed=3, **kw), gradient_shap(model, batch, seed=3, **kw)
    c = gradient_shap(model, batch, seed=4, **kw)
    assert torch.equal(a.source, b.source)
    assert not torch.allclose(a.source, c.source)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gradient_shap(model, batch, generator=g1, **kw).source,
                       gradient_shap(model, batch, generator=g2, **kw).source)
    for row in range(len(batch)):  # a row draws the same numbers alone or in the batch
        one = gradient_shap(model, batch.select([row]), seed=3, **kw)
        n_tgt = int(batch.target_mask[row].sum())
        torch.testing.assert_close(a.source[row, :n_tgt][:, batch.source_mask[row]],
                                   one.source[0, :n_tgt], rtol=1e-9, atol=1e-12)


def test_mean_approaches_expected_gradients(gpt2):
    """Expected gradients over {unk, zeros} without noise = the mean of IG with each baseline."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    want = sum(integrated_gradients(model, batch, logprob, n_steps=48, baseline=b).source
               for b in ("unk", "zeros")) / 2

    def error(n):
        got = gradient_shap(model, batch, logprob, n_samples=n, baseline=("unk", "zeros"), seed=0,
                            internal_batch_size=256).source
        return float((got - want).norm() / want.norm())

    small, large = error(8), error(1024)
    assert large < small / 3  # Monte Carlo: ~1/sqrt(n)
    assert large < 0.08


def test_delta_is_monte_carlo_error_that_shrinks_with_samples(gpt2):
    """Without noise and with one baseline the sample mean of f(x + e_s) - f(b_s) is
    f(x) - f(b), which IG's sum minus its delta also is; with noise and two baselines, the mean
    |delta| falls about 4x (sqrt 16) from 4 to 64 draws (seed 0: 4.3x; asserted: 2x)."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)

    def ends(out):  # sum of scores minus delta (both 0 at padding)
        return out.source.sum((2, 3)) + out.target.sum((2, 3)) - out.delta

    ig = integrated_gradients(model, batch, n_steps=2, baseline="zeros")
    torch.testing.assert_close(ends(gradient_shap(model, batch, n_samples=3, baseline="zeros")),
                               ends(ig), rtol=1e-9, atol=1e-12)

    def mean_abs_delta(n):
        out = gradient_shap(model, batch, n_samples=n, stdevs=0.05, baseline=("unk", "zeros"),
                            seed=0, internal_batch_size=128)
        return float(out.delta[out.step_mask].abs().mean())

    small, large = mean_abs_delta(4), mean_abs_delta(64)
    assert 0 < large < small / 2


def test_unchanged_range_and_errors(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    full = gradient_shap(model, batch, n_samples=3)
    part = gradient_shap(model, batch, n_samples=3, attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, full.source[:, 1:3], rtol=1e-9, atol=1e-12)
    for bad in ({"n_samples": 0}, {"stdevs": -1.0}, {"baseline": ()}):
        with pytest.raises(ValueError):
            gradient_shap(model, batch, **bad)
    assert_unchanged(model, before)

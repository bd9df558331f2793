import pytest
import torch

from fnattr import prepare
from fnattr.methods import _paths
from fnattr.methods.sequential_ig import sequential_integrated_gradients as sig
from fnattr.targets import logprob
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _unk(ids, special, unk):
    return torch.where(special, ids, unk)


def _per_step(model, tok, batch, row, t, n_steps):
    """SIG of step t on the unpadded prefix: each non-special token moved alone, plain autograd."""
    ms, mt = batch.source_mask[row], batch.target_mask[row]
    src, tgt = batch.source_ids[row][ms], batch.target_ids[row][mt]
    sp_s, sp_t = batch.source_special[row][ms], batch.target_special[row][mt]
    xs, xt = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    bs, bt = prefix_inputs(model, _unk(src, sp_s, tok.unk_token_id), _unk(tgt, sp_t, tok.unk_token_id),
                           t, batch.decoder_start_id)
    lo = 1 if model.config.is_encoder_decoder else 0  # decoder start token: not attributed
    alphas, weights = _paths.quadrature("gausslegendre", n_steps)
    out = [torch.zeros_like(xs), torch.zeros_like(xt[lo:])]
    tokens = [(0, p) for p in range(len(src)) if not sp_s[p]] + \
             [(1, j) for j in range(t) if not sp_t[j]]
    for side, p in tokens:
        x, b = (xs, bs) if side == 0 else (xt, bt)
        q = p if side == 0 else p + lo
        for a, w in zip(alphas, weights):
            emb = x.clone()
            leaf = (b[q] + a * (x[q] - b[q])).requires_grad_()
            emb[q] = leaf
            args = (emb, xt) if side == 0 else (xs, emb)
            (g,) = torch.autograd.grad(step_score(model, *args, int(tgt[t]), logprob), leaf)
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

import pytest
import torch

from fnattr import prepare
from fnattr.methods import METHODS, occlusion
from fnattr.attribution import attribution_context
from fnattr.methods.occlusion import perturbed_scores, windows
from fnattr.targets import logprob, probability
from tests.reference import _embeddings, prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"


def _reference(model, batch, target_fn, window, stride):
    """Per-step loop, one model run per (step, window), straight from tests/reference.py."""
    src, tgt, start = batch.source_ids[0], batch.target_ids[0], batch.decoder_start_id
    enc_dec = model.config.is_encoder_decoder
    unk = {side: _embeddings(model, side)(torch.tensor([batch.unk_id]))[0].detach()
           for side in ("source", "target")}
    src_pos = (~batch.source_special[0]).nonzero().squeeze(1).tolist()
    tgt_pos = (~batch.target_special[0][:-1]).nonzero().squeeze(1).tolist()
    n, m = len(src), len(tgt)
    want_src, want_tgt = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
    for k in range(m):
        with torch.no_grad():
            s, p = prefix_inputs(model, src, tgt, k, start)
            f = step_score(model, s, p, int(tgt[k]), target_fn)
            for side, pos, out in (("source", src_pos, want_src), ("target", tgt_pos, want_tgt)):
                count = torch.zeros(out.shape[1], dtype=torch.float64)
                for w in windows(len(pos), window, stride):
                    cols = [pos[i] for i in w]
                    s2, p2 = s.clone(), p.clone()
                    for c in cols:
                        if side == "source":
                            s2[c] = unk["source"]
                        elif c < k:  # later target tokens are not in step k's input
                            p2[c + enc_dec] = unk["target"]
                    out[k, cols] += f - step_score(model, s2, p2, int(tgt[k]), target_fn)
                    count[cols] += 1
                out[k] /= count.clamp(min=1)
        want_tgt[k, k:] = 0  # a window's part that step k cannot see is not its input
    return want_src, want_tgt


@pytest.mark.parametrize("window,stride", [(1, 1), (3, 2)])
def test_one_forward_per_window_equals_per_step_loop(any_model, window, stride):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = occlusion(model, batch, logprob, window=window, stride=stride, attribute_target=True)
    want_src, want_tgt = _reference(model, batch, logprob, window, stride)
    assert out.extra_dims == () and out.source.shape == (1, *want_src.shape)
    torch.testing.assert_close(out.source[0], want_src, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(out.target[0], want_tgt, rtol=1e-9, atol=1e-13)
    assert (out.source != 0).sum() > out.source.shape[1]  # not a vacuous comparison
    assert torch.all(out.source[0][:, batch.source_special[0]] == 0)  # BOS/EOS are kept


def test_occluding_a_later_target_token_changes_earlier_steps_by_exactly_zero(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    with attribution_context(model, batch, attribute_target=True,
                             attr_pos_start=None, attr_pos_end=None) as ctx:
        n_tgt = batch.target_ids.shape[1]
        # row j + 1 occludes target token j; row 0 is the clean input, in the same forward
        occ_tgt = torch.eye(n_tgt, dtype=torch.bool).roll(1, 0)
        occ_tgt[0] = False
        occ_src = torch.zeros(n_tgt, batch.source_ids.shape[1], dtype=torch.bool)
        rows = torch.zeros(n_tgt, dtype=torch.long)
        fills = tuple(torch.zeros_like(x) for x in (ctx.embedded.source, ctx.embedded.target))
        scores = perturbed_scores(ctx, probability, rows, (occ_src, occ_tgt), fills, 64)
    clean = scores[0]
    for j in range(n_tgt - 1):
        # steps <= j cannot see token j: equal up to float64 rounding (on some CPUs a row's matrix
        # products round differently by its place in the batch, e.g. 4e-19 at 2e-3)
        torch.testing.assert_close(scores[j + 1, : j + 1], clean[: j + 1], rtol=1e-14, atol=0)
        assert (scores[j + 1, j + 1:] - clean[j + 1:]).abs().max() > 1e-8
    out = occlusion(model, batch)
    later = torch.ones(n_tgt, n_tgt, dtype=torch.bool).tril().logical_not().logical_or(
        torch.eye(n_tgt, dtype=torch.bool))
    assert torch.all(out.target[0][later] == 0)


def test_batched_and_chunked_equal_single(any_model):
    model, tok = any_model
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    targets = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, targets)
    out = occlusion(model, batch, window=2, attribute_target=True, internal_batch_size=5)
    chunk1 = occlusion(model, batch, window=2, attribute_target=True, internal_batch_size=1)
    torch.testing.assert_close(out.source, chunk1.source, rtol=1e-9, atol=1e-13)
    for i in range(len(sources)):
        one = occlusion(model, prepare(model, tok, sources[i], targets[i]), window=2,
                        attribute_target=True)
        n_tgt, cols = one.target_ids.shape[1], batch.source_mask[i]
        torch.testing.assert_close(out.source[i, :n_tgt][:, cols], one.source[0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(out.target[i, :n_tgt, :n_tgt], one.target[0], rtol=1e-8, atol=1e-12)
        assert torch.all(out.source[i, :, ~cols] == 0)


def test_step_range_and_step_scores(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    full = occlusion(model, batch, step_scores=["logprob"])
    part = occlusion(model, batch, attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, full.source[:, 1:3], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(part.target, full.target[:, 1:3], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(full.step_scores["logprob"], full.step_scores["probability"].log())


def test_windows():
    assert windows(5, 1, 1) == [range(i, i + 1) for i in range(5)]
    assert windows(5, 2, 2) == [range(0, 2), range(2, 4), range(3, 5)]  # the last ends at n
    assert windows(2, 4, 1) == [range(0, 2)]
    assert windows(0, 2, 1) == []


def test_model_unchanged_also_after_an_error(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    occlusion(model, batch, baseline="zeros")
    assert_unchanged(model, before)

    def fails_on_perturbed(logits, target_ids):
        if logits.shape[0] > 1:
            raise ArithmeticError("inside")
        return probability(logits, target_ids)

    with pytest.raises(ArithmeticError):
        occlusion(model, batch, fails_on_perturbed)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="`window`"):
        occlusion(model, batch, window=0)
    assert METHODS["occlusion"] is occlusion

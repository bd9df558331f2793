import pytest
import torch

from fnattr import prepare
from fnattr.methods import input_x_gradient, saliency
from fnattr.targets import logprob, probability
from tests.reference import step_gradient
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"


def _expected(method, s, p, gs, gp):
    if method is saliency:
        return gs, gp
    return gs * s, gp * p


@pytest.mark.parametrize("method", [saliency, input_x_gradient], ids=["saliency", "ixg"])
@pytest.mark.parametrize("target_fn", [probability, logprob], ids=["prob", "logprob"])
def test_equals_per_step_autograd_reference(any_model, method, target_fn):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    kwargs = {"abs": False} if method is saliency else {}
    out = method(model, batch, target_fn, attribute_target=True, **kwargs)
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    assert out.source.shape == (1, len(tgt), len(src), model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
    for k in range(len(tgt)):
        s, p, gs, gp = step_gradient(model, src, tgt, k, batch.decoder_start_id, target_fn)
        want_src, want_tgt = _expected(method, s, p, gs, gp)
        if model.config.is_encoder_decoder:  # the decoder start token is not a target token
            want_tgt = want_tgt[1:]
        torch.testing.assert_close(out.source[0, k], want_src, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(out.target[0, k, :k], want_tgt, rtol=1e-9, atol=1e-14)
        assert torch.all(out.target[0, k, k:] == 0)  # tokens the step cannot see score exactly 0
    assert out.source.abs().sum() > 0


def test_saliency_is_absolute_gradient(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    signed, absolute = saliency(model, batch, abs=False), saliency(model, batch)
    torch.testing.assert_close(absolute.source, signed.source.abs(), rtol=0, atol=0)
    assert (signed.source < 0).any()


@pytest.mark.parametrize("method", [saliency, input_x_gradient], ids=["saliency", "ixg"])
def test_batched_equals_single(any_model, method):
    model, tok = any_model
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    targets = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, targets)
    out = method(model, batch, attribute_target=True)
    for i in range(len(sources)):
        one = method(model, prepare(model, tok, sources[i], targets[i]), attribute_target=True)
        n_tgt = one.target_ids.shape[1]
        cols = batch.source_mask[i]
        torch.testing.assert_close(out.source[i, :n_tgt][:, cols], one.source[0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(out.target[i, :n_tgt, :n_tgt], one.target[0], rtol=1e-8, atol=1e-12)
        assert torch.all(out.source[i, :, ~cols] == 0)       # padding scores exactly 0
        assert torch.all(out.source[i, n_tgt:] == 0)          # padding steps too
        torch.testing.assert_close(out.step_scores["probability"][i, :n_tgt],
                                   one.step_scores["probability"][0], rtol=1e-9, atol=0)


def test_attr_pos_range_selects_steps(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    full = saliency(model, batch, attribute_target=True)
    part = saliency(model, batch, attribute_target=True, attr_pos_start=1, attr_pos_end=3)
    assert part.steps.tolist() == [1, 2]
    torch.testing.assert_close(part.source[0], full.source[0, 1:3], rtol=1e-10, atol=0)
    torch.testing.assert_close(part.step_scores["probability"], full.step_scores["probability"][:, 1:3])


@pytest.mark.parametrize("start,end", [(3, 3), (0, 99), (-99, None)])
def test_bad_positions_name_the_argument(gpt2, start, end):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises(ValueError, match="attr_pos"):
        saliency(model, batch, attr_pos_start=start, attr_pos_end=end)
    assert_unchanged(model, before)


def test_decoder_only_without_target_side(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    with_tgt = saliency(model, batch)
    without = saliency(model, batch, attribute_target=False)
    assert with_tgt.target is not None and without.target is None
    torch.testing.assert_close(without.source, with_tgt.source, rtol=1e-10, atol=0)


def test_encoder_decoder_target_side_only_when_asked(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    assert saliency(model, batch).target is None
    assert saliency(model, batch, attribute_target=True).target is not None


@pytest.mark.parametrize("method", [saliency, input_x_gradient], ids=["saliency", "ixg"])
def test_model_unchanged(any_model, method):
    model, tok = any_model
    model.train()  # a method must not leave its own mode behind, nor keep the user's either way
    before = snapshot(model)
    try:
        method(model, prepare(model, tok, [SOURCE], [TARGET]))
        assert_unchanged(model, before)
    finally:
        model.eval()


def test_custom_target_function(any_model):
    model, tok = any_model

    def top_logit_margin(logits, target_ids):
        picked = logits.gather(-1, target_ids[..., None])[..., 0]
        return picked - logits.max(-1).values

    out = saliency(model, prepare(model, tok, [SOURCE], [TARGET]), top_logit_margin)
    assert "top_logit_margin" in out.step_scores and out.meta["target_fn"] == "top_logit_margin"


def test_step_scores_from_the_same_forward(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = saliency(model, batch, step_scores=["logprob", "logit"])
    torch.testing.assert_close(out.step_scores["probability"].log(), out.step_scores["logprob"])
    with pytest.raises(ValueError, match="step_scores"):
        saliency(model, batch, step_scores=["no_such_score"])

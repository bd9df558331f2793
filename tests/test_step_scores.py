"""Step scores: equal to a per-step reference, the same alone or beside an attribution, and
custom target functions with every method."""

import inspect

import pytest
import torch

import fnattr
from fnattr import prepare, targets
from fnattr.api import compute_step_scores
from fnattr.methods import METHODS, input_x_gradient, integrated_gradients, saliency
from tests.reference import prefix_inputs

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran"]
FAST = {"n_steps": 4, "points_per_segment": 1, "n_samples": 8, "max_probe_steps": 5,
        "num_probes": 2, "n_neighbors": 8, "abs": False}


def fast_options(method) -> dict:
    """Small sample / step counts for the options `method` takes (keeps every-method tests fast)."""
    params = inspect.signature(method).parameters
    return {k: v for k, v in FAST.items() if k in params}
NAMES = sorted(targets.TARGETS)


def _reference_logits(model, batch):
    """[batch tgt vocab] logits, one plain forward per (row, step) on the unpadded prefix."""
    out = torch.zeros(*batch.target_ids.shape, model.config.vocab_size, dtype=torch.float64)
    for row in range(len(batch)):
        src = batch.source_ids[row][batch.source_mask[row]]
        tgt = batch.target_ids[row][batch.target_mask[row]]
        for t in range(len(tgt)):
            s, p = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
            with torch.no_grad():
                if model.config.is_encoder_decoder:
                    logits = model(inputs_embeds=s[None], decoder_inputs_embeds=p[None]).logits
                else:
                    logits = model(inputs_embeds=torch.cat([s, p])[None]).logits
            out[row, t] = logits[0, -1]
    return out


def test_step_scores_equal_per_step_reference(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = saliency(model, batch, step_scores=NAMES, attr_pos_start=1)
    ref = _reference_logits(model, batch)
    mask = batch.target_mask[:, 1:]
    for name in NAMES:
        want = targets.TARGETS[name](ref, batch.target_ids)[:, 1:] * mask
        torch.testing.assert_close(out.step_scores[name], want, rtol=1e-9, atol=1e-10, msg=name)
    assert torch.all(out.step_scores["probability"][~mask] == 0)


@pytest.mark.parametrize("method", [saliency, input_x_gradient, integrated_gradients],
                         ids=["saliency", "ixg", "ig"])
def test_step_scores_alone_equal_alongside(any_model, method):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = {"n_steps": 3} if method is integrated_gradients else {}
    for start, end in ((None, None), (1, -1)):
        out = method(model, batch, targets.logprob, step_scores=NAMES, attr_pos_start=start,
                     attr_pos_end=end, **kwargs)
        alone = compute_step_scores(model, batch, [targets.logprob, *NAMES],
                                    attr_pos_start=start, attr_pos_end=end)
        assert out.step_scores.keys() == alone.keys()
        for name, scores in alone.items():  # equal to rounding: on a CPU, saliency's forward
            # may run in pieces along the positions (fnattr.methods._triangular)
            torch.testing.assert_close(out.step_scores[name], scores, rtol=0, atol=1e-12, msg=name)


def twice_logprob(logits, target_ids):
    """A user's target function: nothing to register."""
    return 2 * logits.log_softmax(-1).gather(-1, target_ids[..., None])[..., 0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_custom_target_works_with_every_method(any_model, name):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    method = METHODS[name]
    kwargs = fast_options(method)
    out = method(model, batch, twice_logprob, step_scores=["logprob"], **kwargs)
    torch.testing.assert_close(out.step_scores["twice_logprob"], 2 * out.step_scores["logprob"])
    assert out.meta["target_fn"] == "twice_logprob"
    assert torch.isfinite(out.source).all()
    if name in ("saliency", "input_x_gradient", "integrated_gradients"):  # linear in the target
        plain = method(model, batch, targets.logprob, **kwargs)
        torch.testing.assert_close(out.source, 2 * plain.source, rtol=1e-9, atol=1e-12)


def test_attribute_resolves_names_and_options(any_model):
    model, tok = any_model
    out = fnattr.attribute(model, tok, SOURCES, method="saliency", target_fn="crossentropy",
                           max_new_tokens=3, generate_kwargs={"do_sample": False},
                           step_scores=["entropy", "top_p_size"], target_args={"top_p": 0.5},
                           attribute_target=True)
    batch = prepare(model, tok, SOURCES, max_new_tokens=3, do_sample=False)
    half = compute_step_scores(model, batch, ["crossentropy", "entropy"])
    assert out.meta["target_fn"] == "crossentropy"
    for name in ("crossentropy", "entropy"):
        assert torch.equal(out.step_scores[name], half[name])
    sizes = targets.top_p_size(_reference_logits(model, batch), batch.target_ids, top_p=0.5)
    torch.testing.assert_close(out.step_scores["top_p_size"], sizes * batch.target_mask)
    with pytest.raises(ValueError, match="is unknown"):
        fnattr.attribute(model, tok, SOURCES, TARGETS, target_fn="no_such_score")


def test_mc_dropout_by_name(gpt2):
    model, tok = gpt2
    out = fnattr.attribute(model, tok, SOURCES, TARGETS, step_scores=["mc_dropout_prob_avg"],
                           target_args={"n_mcd_steps": 3, "seed": 5})
    batch = prepare(model, tok, SOURCES, TARGETS)
    want = targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=3, seed=5)(
        torch.zeros(2, batch.target_ids.shape[1], 1, dtype=torch.float64), batch.target_ids)
    torch.testing.assert_close(out.step_scores["mc_dropout_prob_avg"], want * batch.target_mask)

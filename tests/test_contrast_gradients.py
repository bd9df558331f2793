"""Contrastive targets as attributed targets: the gradient of the whole contrastive expression.

Each test compares fnattr with a plain per-step autograd reference in which the contrast forward
reads the same source (or target prefix) embeddings as the attributed forward.
"""

import math

import pytest
import torch

from fnattr import prepare, targets
from fnattr.contrast import prepare_contrast
from fnattr.methods import (
    deeplift, input_x_gradient, integrated_gradients, layer_deeplift, layer_gradient_x_activation,
    layer_integrated_gradients, occlusion, saliency,
)
from tests.conftest import _get
from tests.reference import prefix_inputs

SOURCES = ["The capital of France is", "A dog"]
TARGETS = [" Paris is a city", " ran in the park"]
CONTRAST_TARGETS = [" Rome is a city in Italy", " sat on the mat"]
CONTRAST_SOURCES = ["The capital of Italy is", "The cat"]


@pytest.fixture(params=["gpt2", "bart"])
def two_models(request):
    """One decoder-only and one encoder-decoder model (the exhaustive grids run on these)."""
    return _get(request, request.param)


def _contrast_kwargs(shared: str) -> dict:
    """Contrast arguments that share `shared` ("source" or "target") with the attributed batch
    (contrast targets in their own context: the forward that `fnattr.contrast.rerun` reruns)."""
    if shared in ("source", "same"):  # "same": contrast targets scored under the attributed prefix
        return {"contrast_targets": CONTRAST_TARGETS, "contrast_targets_alignments": "auto",
                "contrast_context": "own" if shared == "source" else "same"}
    return {"contrast_sources": CONTRAST_SOURCES}


# (contrast_targets given, contrast_sources given, contrast_context): every kind of contrast
CASES = {
    "targets-same": (True, False, "same"), "targets-own": (True, False, "own"),
    "sources": (False, True, "same"), "both-same": (True, True, "same"), "both-own": (True, True, "own"),
}


def _formula(name: str, z: torch.Tensor, y: int, zc: torch.Tensor, yc: int) -> torch.Tensor:
    """The contrastive expression of one step, written out from its definition."""
    logp, logq = z.log_softmax(-1), zc.log_softmax(-1)
    return {
        "contrast_logits": zc[yc],
        "contrast_prob": logq.exp()[yc],
        "contrast_logits_diff": z[y] - zc[yc],
        "contrast_prob_diff": logp.exp()[y] - logq.exp()[yc],
        "pcxmi": (logp[y] - logq[yc]) / math.log(2),
        "in_context_pvi": (logp[y] - logq[yc]) / math.log(2),
        "kl_divergence": (logp.exp() * (logp - logq)).sum(),
    }[name]


def _last_logits(model, src_emb, tgt_emb):
    if model.config.is_encoder_decoder:
        return model(inputs_embeds=src_emb[None], decoder_inputs_embeds=tgt_emb[None]).logits[0, -1]
    return model(inputs_embeds=torch.cat([src_emb, tgt_emb])[None]).logits[0, -1]


def _unpadded(batch, row):
    return (batch.source_ids[row][batch.source_mask[row]],
            batch.target_ids[row][batch.target_mask[row]])


def _reference(model, batch, cbatch, contrast, names, row, t, case):
    """{name: (expression_t, d/d source embeddings, d/d target-prefix embeddings)}, one example,
    written from the definition: the foil y'_c (c aligned with t) scored on the contrast source
    (x where none is given) and, in the same context, the attributed prefix y_<t, in the own
    context the contrast's prefix y'_<c. Whatever reads x or y_<t reads the differentiated
    embeddings. One forward of each side serves every name."""
    has_tgt, has_src, context = CASES[case]
    src, tgt = _unpadded(batch, row)
    c_src, c_tgt = _unpadded(cbatch, row)
    c = dict(contrast.alignments[row])[t]
    s, p = (e.clone().requires_grad_() for e in prefix_inputs(model, src, tgt, t, batch.decoder_start_id))
    own = has_tgt and context == "own"
    cs, cp = prefix_inputs(model, c_src, c_tgt if own else tgt, c if own else t, batch.decoder_start_id)
    cs = cs if has_src else s
    cp = cp if own else p
    z, zc = _last_logits(model, s, p), _last_logits(model, cs, cp)
    out = {}
    for name in names:
        value = _formula(name, z, int(tgt[t]), zc, int(c_tgt[c]))
        gs, gp = torch.autograd.grad(value, (s, p), allow_unused=True, materialize_grads=True,
                                     retain_graph=True)
        if model.config.is_encoder_decoder:
            gp = gp[1:]  # the decoder start position is not attributed
        out[name] = value.detach(), gs, gp
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_contrastive_gradient_equals_autograd_of_whole_expression(two_models, case):
    """Every contrastive function, every kind of contrast, both contexts: the value and the
    gradient of every step equal a plain autograd of the expression written out for that step."""
    _check_against_reference(*two_models, case)


@pytest.fixture(params=["llama", "marian"])
def other_models(request, decoder_tokenizer, seq2seq_tokenizer):
    """A second decoder-only (Llama) and encoder-decoder (Marian) model, for both contexts."""
    from tests.architectures import build

    tok = seq2seq_tokenizer if request.param == "marian" else decoder_tokenizer
    cache = request.getfixturevalue("models_cache")
    key = f"contrast-{request.param}"
    if key not in cache:
        cache[key] = build(request.param, len(tok))
    return cache[key], tok


@pytest.mark.parametrize("case", ["targets-same", "targets-own"])
def test_both_contexts_equal_autograd_on_llama_and_marian(other_models, case):
    _check_against_reference(*other_models, case)


def _check_against_reference(model, tok, case):
    # Llama's RMSNorm normalises in float32: one backward of z[y] - z[y'] and two backwards
    # subtracted at the input round apart at float32's precision there (exact elsewhere)
    llama = type(model).__name__.startswith("Llama")
    tol = {"rtol": 1e-5, "atol": 1e-6} if llama else {"rtol": 1e-7, "atol": 1e-10}
    has_tgt, has_src, context = CASES[case]
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = {"contrast_targets": CONTRAST_TARGETS if has_tgt else None,
              "contrast_sources": CONTRAST_SOURCES if has_src else None,
              "contrast_targets_alignments": "auto" if has_tgt else None,
              "contrast_context": context}
    contrast = prepare_contrast(model, tok, batch, **kwargs)
    names = sorted(targets.CONTRAST_TARGETS)
    if case == "targets-same":  # p'_t = p_t: the KL would be 0 at every step, refused
        with pytest.raises(ValueError, match="contrast_context='own'"):
            targets.kl_divergence(contrast)
        names.remove("kl_divergence")
    cbatch = prepare(model, tok, CONTRAST_SOURCES if has_src else SOURCES,
                     CONTRAST_TARGETS if has_tgt else TARGETS)
    outs = {}
    for name in names:
        fn = targets.CONTRAST_TARGETS[name](contrast)
        outs[name] = saliency(model, batch, fn, abs=False, attribute_target=True, step_scores=[fn])
    for row in range(len(SOURCES)):
        src_cols = batch.source_mask[row].nonzero().squeeze(1)
        for k in range(int(batch.target_mask[row].sum())):
            ref = _reference(model, batch, cbatch, contrast, names, row, k, case)
            for name, (value, gs, gp) in ref.items():
                out = outs[name]
                torch.testing.assert_close(out.step_scores[name][row, k], value, rtol=1e-9,
                                           atol=1e-12, msg=name)
                torch.testing.assert_close(out.source[row, k][src_cols], gs, **tol, msg=name)
                torch.testing.assert_close(out.target[row, k, :k], gp, **tol, msg=name)


def test_contrast_term_is_not_dropped(gpt2):
    """Regression: p - p' differs from the gradient of p alone when the contrast shares the source."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRAST_TARGETS,
                                contrast_targets_alignments="auto", contrast_context="own")
    diff = saliency(model, batch, targets.contrast_prob_diff(contrast), abs=False)
    plain = saliency(model, batch, targets.probability, abs=False)
    assert (diff.source - plain.source).abs().max() > 1e-3 * plain.source.abs().max()


def test_no_shared_side_is_a_constant_contrast(gpt2):
    """Both sides replaced: the contrast does not depend on the attributed input."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRAST_TARGETS,
                                contrast_sources=CONTRAST_SOURCES, contrast_targets_alignments="auto",
                                contrast_context="own")
    assert contrast.shared is None
    diff = saliency(model, batch, targets.contrast_prob_diff(contrast), abs=False)
    plain = saliency(model, batch, targets.probability, abs=False)
    torch.testing.assert_close(diff.source, plain.source, rtol=1e-12, atol=1e-15)


METHODS = {
    "saliency": lambda m, b, f, **kw: saliency(m, b, f, abs=False, **kw),
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": lambda m, b, f, **kw: integrated_gradients(m, b, f, n_steps=4, **kw),
    "deeplift": deeplift,
    "occlusion": occlusion,
    "layer_integrated_gradients":
        lambda m, b, f, **kw: layer_integrated_gradients(m, b, f, n_steps=4, **kw),
    "layer_gradient_x_activation": layer_gradient_x_activation,
    "layer_deeplift": layer_deeplift,
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_contrast_equal_to_target_attributes_zero(two_models, method):
    """p(y | x, y_<t) - p'(y' | x, y'_<t) with y' = y is 0 for every source x: every method
    attributes exactly 0 (own context: the contrast is rerun at every perturbed source; the
    target side is not attributed: the contrast keeps its own)."""
    model, tok = two_models
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=TARGETS, contrast_context="own")
    out = METHODS[method](model, batch, targets.contrast_prob_diff(contrast), attribute_target=False)
    plain = METHODS[method](model, batch, targets.probability, attribute_target=False)
    assert plain.source.abs().max() > 1e-6
    torch.testing.assert_close(out.source, torch.zeros_like(out.source), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shared", ["source", "target", "same"])
def test_integrated_gradients_complete_for_whole_expression(any_model, shared):
    """IG's scores sum to f(x) - f(baseline) with f = z[y] - z'[y'] evaluated at both ends."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = _contrast_kwargs(shared)
    fn = targets.contrast_logits_diff(prepare_contrast(model, tok, batch, **kwargs))
    coarse = integrated_gradients(model, batch, fn, n_steps=4, attribute_target=True)
    fine = integrated_gradients(model, batch, fn, n_steps=24, attribute_target=True)
    expected = fine.source.flatten(2).sum(-1) + fine.target.flatten(2).sum(-1) - fine.delta
    assert expected.abs().max() > 1e-3  # f(x) - f(baseline) of the whole expression
    assert fine.delta.abs().max() < 0.05 * expected.abs().max()
    assert fine.delta.abs().max() < coarse.delta.abs().max()


@pytest.mark.parametrize("shared", ["source", "target", "same"])
def test_layer_methods_at_embeddings_equal_input_methods(any_model, shared):
    """At the embedding layer, layer methods see the same contrastive expression."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = _contrast_kwargs(shared)
    fn = targets.contrast_prob_diff(prepare_contrast(model, tok, batch, **kwargs))
    pairs = [(layer_gradient_x_activation(model, batch, fn, attribute_target=True),
              input_x_gradient(model, batch, fn, attribute_target=True)),
             (layer_integrated_gradients(model, batch, fn, n_steps=4, attribute_target=True),
              integrated_gradients(model, batch, fn, n_steps=4, attribute_target=True))]
    for layer_out, input_out in pairs:
        torch.testing.assert_close(layer_out.source, input_out.source, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(layer_out.target, input_out.target, rtol=1e-7, atol=1e-12)


def test_deep_layer_integrated_gradients_complete_with_contrast(gpt2):
    """A whole block of a decoder-only model: source positions are shared at any depth."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    fn = targets.contrast_prob_diff(prepare_contrast(
        model, tok, batch, contrast_targets=CONTRAST_TARGETS, contrast_targets_alignments="auto",
        contrast_context="own"))
    out = layer_integrated_gradients(model, batch, fn, layer="transformer.h.0", n_steps=24,
                                     attribute_target=False)
    plain = layer_integrated_gradients(model, batch, targets.probability, layer="transformer.h.0",
                                       n_steps=24, attribute_target=False)
    assert out.delta.abs().max() < 1e-4
    assert (out.source - plain.source).abs().max() > 1e-4 * plain.source.abs().max()

import json

import pytest
import torch
from captum.attr import LayerIntegratedGradients

from fnattr import prepare
from fnattr.methods import integrated_gradients
from fnattr.methods.gradient import input_x_gradient
from fnattr.methods.layer import layer_gradient_x_activation, layer_integrated_gradients
from fnattr.targets import logprob, probability
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]
# a deep layer of each tiny architecture, and the side its positions belong to
DEEP = {"GPT2LMHeadModel": "transformer.h.0", "LlamaForCausalLM": "model.layers.1",
        "BartForConditionalGeneration": "model.encoder.layers.1",
        "T5ForConditionalGeneration": "encoder.block.0.layer.1"}
DECODER_LAYER = {"BartForConditionalGeneration": "model.decoder.layers.0",
                 "T5ForConditionalGeneration": "decoder.block.1"}


def _ref_layer_grad(model, name, batch, row, t, target_fn):
    """Plain per-step run of one unpadded example: the layer's output at each position and the
    gradient of step t's score w.r.t. it (a leaf put in by a plain forward hook)."""
    src = batch.source_ids[row][batch.source_mask[row]]
    tgt = batch.target_ids[row][batch.target_mask[row]]
    s, p = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    leaves = []

    def hook(module, args, out):
        main = out[0] if isinstance(out, tuple) else out
        leaves.append(main.detach().requires_grad_())
        return leaves[-1] if not isinstance(out, tuple) else (leaves[-1], *out[1:])

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        score = step_score(model, s, p, int(tgt[t]), target_fn)
    finally:
        h.remove()
    (leaf,) = leaves
    (grad,) = torch.autograd.grad(score, leaf)
    return leaf.detach()[0], grad[0]


def _positions(model, name, batch, row, t):
    """(source columns, target columns) of the batch that the reference's layer positions hold."""
    src_cols = batch.source_mask[row].nonzero().squeeze(1)
    if model.config.is_encoder_decoder:
        in_dec = any(m is model.get_submodule(name) for m in model.get_decoder().modules())
        return (None, torch.arange(t)) if in_dec else (src_cols, None)
    return src_cols, torch.arange(t)


@pytest.mark.parametrize("deep", [False, True])
def test_gradient_x_activation_equals_per_step(any_model, deep):
    model, tok = any_model
    cls = type(model).__name__
    name = DEEP[cls] if deep else None
    at = model.config.is_encoder_decoder is False
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = layer_gradient_x_activation(model, batch, logprob, layer=name, attribute_target=at)
    if name is None:  # on the embeddings this is input x gradient
        ref = input_x_gradient(model, batch, logprob, attribute_target=at)
        torch.testing.assert_close(out.source, ref.source, rtol=1e-9, atol=1e-12)
        return
    for row in range(len(batch)):
        n_src = int(batch.source_mask[row].sum())
        for t in range(int(batch.target_mask[row].sum())):
            act, grad = _ref_layer_grad(model, name, batch, row, t, logprob)
            want = act * grad
            src_cols, tgt_cols = _positions(model, name, batch, row, t)
            torch.testing.assert_close(out.source[row, t, src_cols], want[:n_src], rtol=1e-7, atol=1e-12)
            if at:
                torch.testing.assert_close(out.target[row, t, :t], want[n_src:], rtol=1e-7, atol=1e-12)
                assert torch.all(out.target[row, t, t:] == 0)


def test_decoder_layer_of_encoder_decoder(seq2seq_model):
    model, tok = seq2seq_model
    name = DECODER_LAYER[type(model).__name__]
    batch = prepare(model, tok, SOURCES, TARGETS)
    with pytest.raises(ValueError, match="attribute_target=True"):
        layer_gradient_x_activation(model, batch, layer=name)
    with pytest.raises(ValueError, match="encoder layer"):
        layer_gradient_x_activation(model, batch, layer=DEEP[type(model).__name__],
                                    attribute_target=True)
    out = layer_gradient_x_activation(model, batch, layer=name, attribute_target=True)
    assert torch.all(out.source == 0)
    for row in range(len(batch)):
        for t in range(int(batch.target_mask[row].sum())):
            act, grad = _ref_layer_grad(model, name, batch, row, t, probability)
            # position 0 is the decoder start token (not attributed); j + 1 is target token j
            torch.testing.assert_close(out.target[row, t, :t], (act * grad)[1:], rtol=1e-7, atol=1e-12)


def test_layer_ig_on_embeddings_equals_ig(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    for at in (False, True):
        ig = integrated_gradients(model, batch, n_steps=4, attribute_target=at)
        lig = layer_integrated_gradients(model, batch, n_steps=4, attribute_target=at,
                                         internal_batch_size=3)
        torch.testing.assert_close(lig.source, ig.source, rtol=1e-9, atol=1e-12)
        if at:
            torch.testing.assert_close(lig.target, ig.target, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(lig.delta, ig.delta, rtol=1e-6, atol=1e-10)


@pytest.mark.filterwarnings("ignore::fnattr.methods._path.refine.ConvergenceWarning")
def test_layer_ig_auto_trapezoid_equals_fixed_rule_at_its_points(decoder_model):
    """Nested refinement (8, 15, 29 trapezoid points, each reusing the last level's) at a deep
    layer gives each step exactly the fixed rule with its points."""
    model, tok = decoder_model
    name = DEEP[type(model).__name__]
    batch = prepare(model, tok, SOURCES, TARGETS)
    tolerance = {"GPT2LMHeadModel": 1e-3, "LlamaForCausalLM": 2e-2}[type(model).__name__]
    out = layer_integrated_gradients(model, batch, layer=name, tolerance=tolerance, max_steps=32,
                                     method="riemann_trapezoid")
    points = torch.tensor(json.loads(out.meta["completeness"])["points"])
    assert len(set(points[out.step_mask].tolist())) > 1
    for n in set(points[out.step_mask].tolist()):
        fixed = layer_integrated_gradients(model, batch, layer=name, n_steps=n, method="riemann_trapezoid")
        sel = (points == n) & out.step_mask
        torch.testing.assert_close(out.source[sel], fixed.source[sel], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.delta[sel], fixed.delta[sel], rtol=1e-8, atol=1e-14)


def test_layer_ig_equals_captum_on_one_step(any_model):
    """Captum's LayerIntegratedGradients on the prefix of step t, with the same UNK baseline."""
    model, tok = any_model
    name = DEEP[type(model).__name__]
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    enc_dec = model.config.is_encoder_decoder
    out = layer_integrated_gradients(model, batch, layer=name, n_steps=6, attribute_target=not enc_dec)
    keep_src, keep_tgt = batch.source_special[0], batch.target_special[0]
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    unk_src, unk_tgt = (torch.where(k, ids, tok.unk_token_id) for k, ids in
                        ((keep_src, src), (keep_tgt, tgt)))
    t = int(batch.target_mask[0].sum()) - 1
    s, p = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    bs, bp = prefix_inputs(model, unk_src, unk_tgt, t, batch.decoder_start_id)
    y = torch.tensor([[int(tgt[t])]])

    def f(x):  # batched: captum replaces the layer's output by all path points at once
        if enc_dec:
            logits = model(inputs_embeds=x, decoder_inputs_embeds=p.expand(len(x), -1, -1)).logits
        else:
            logits = model(inputs_embeds=x).logits
        return probability(logits[:, -1:], y.expand(len(x), 1))[:, 0]

    inputs, base = (s[None], bs[None]) if enc_dec else (torch.cat([s, p])[None], torch.cat([bs, bp])[None])
    lig = LayerIntegratedGradients(f, model.get_submodule(name))
    want = lig.attribute(inputs, baselines=base, n_steps=6, method="gausslegendre")[0]
    n_src = len(src)
    torch.testing.assert_close(out.source[0, t], want[:n_src], rtol=1e-6, atol=1e-10)
    if not enc_dec:
        torch.testing.assert_close(out.target[0, t, :t], want[n_src:], rtol=1e-6, atol=1e-10)


def test_layer_ig_completeness_batched_and_unchanged(any_model):
    model, tok = any_model
    name = DEEP[type(model).__name__]
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    out = layer_integrated_gradients(model, batch, layer=name, n_steps=24, internal_batch_size=7)
    assert_unchanged(model, before)
    assert out.delta.abs().max() < 1e-3  # gauss-legendre, 24 points, smooth tiny model
    assert out.meta["method"] == "layer_integrated_gradients"
    for row in range(len(batch)):
        one = layer_integrated_gradients(model, batch.select([row]), layer=name, n_steps=24)
        n_src = int(batch.source_mask[row].sum())
        n_tgt = int(batch.target_mask[row].sum())
        got = out.source[row, :n_tgt][:, batch.source_mask[row]]
        torch.testing.assert_close(got, one.source[0, :n_tgt, -n_src:] if not model.config.is_encoder_decoder
                                   else one.source[0, :n_tgt, :n_src], rtol=1e-7, atol=1e-12)


def test_attr_pos_range_and_error_leaves_model_unchanged(any_model):
    model, tok = any_model
    name = DEEP[type(model).__name__]
    batch = prepare(model, tok, SOURCES, TARGETS)
    for fn, kw in ((layer_gradient_x_activation, {}), (layer_integrated_gradients, {"n_steps": 3})):
        full = fn(model, batch, layer=name, **kw)
        part = fn(model, batch, layer=name, attr_pos_start=1, attr_pos_end=3, **kw)
        assert part.steps.tolist() == [1, 2]
        torch.testing.assert_close(part.source, full.source[:, 1:3], rtol=1e-9, atol=1e-12)
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a module"):
        layer_integrated_gradients(model, batch, layer="nope.0")
    with pytest.raises(ValueError, match="baseline"):
        layer_integrated_gradients(model, batch, layer=name, baseline="bogus")
    assert_unchanged(model, before)


def test_layer_ig_without_target_keeps_target_positions_actual(decoder_model):
    """attribute_target=False: the source positions go from their activations at the UNK input to
    their actual ones while target positions keep their actual activations; completeness then
    holds against a plain forward built that way."""
    model, tok = decoder_model
    name = DEEP[type(model).__name__]
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    out = layer_integrated_gradients(model, batch, logprob, layer=name, n_steps=24,
                                     attribute_target=False)
    assert out.target is None
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    n = len(src)
    unk = torch.where(batch.source_special[0], src, tok.unk_token_id)
    module = model.get_submodule(name)
    ids, ids_unk = torch.cat([src, tgt[:-1]])[None], torch.cat([unk, tgt[:-1]])[None]

    def run(input_ids, replace=None):
        seen = []

        def hook(m, a, o):
            main = o[0] if isinstance(o, tuple) else o
            seen.append(main)
            if replace is None:
                return None
            return replace if not isinstance(o, tuple) else (replace, *o[1:])
        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits[:, n - 1:]
        finally:
            h.remove()
        return logits, seen[0]

    logits_x, act_x = run(ids)
    _, act_unk = run(ids_unk)
    mixed = torch.cat([act_unk[:, :n], act_x[:, n:]], 1)
    logits_b, _ = run(ids, mixed)
    f = lambda lg: logprob(lg, tgt[None])[0]  # noqa: E731
    want = f(logits_x) - f(logits_b)
    got = out.source[0].flatten(1).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out.delta[0], got - want, rtol=1e-6, atol=1e-9)

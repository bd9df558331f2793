"""DeepLIFT and layer DeepLIFT over every generated step: one forward of [inputs; references]."""

from contextlib import ExitStack
from functools import partial

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import step_gradients
from fnattr.hooks.checkpoint import is_checkpointed
from fnattr.hooks.layer import LayerSpec, layer_hooks
from fnattr.methods import _layers
from fnattr.methods._path import refine as _converge
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, finish, logit_step_scores, run_scored,
)
from fnattr.methods._deeplift_rules import deeplift_rules
from fnattr.methods._layers import Acts
from fnattr.methods.integrated_gradients import Baseline, baselines
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

RULES_DOC = """Multipliers (see `fnattr.methods._deeplift_rules`): the Rescale rule on elementwise
    activation modules as a whole (torch.nn activations, transformers' ACT2FN classes: GELU,
    NewGELU, SiLU, ReLU, ...) and on the elementwise functions exp, log, tanh, sigmoid, erf, sqrt,
    rsqrt, reciprocal, pow, relu, gelu, silu, softplus, elu, mish; the average product rule on
    products of two input-dependent tensors (mul, matmul, bmm, division, e.g. q.k, attn.v, gated
    MLPs); softmax, log_softmax (also in the target function), layer_norm, rms_norm and SDPA are
    decomposed into these, so they are exact too. Any other nonlinear op falls back to its
    gradient, and `delta` shows the error it causes. Models that compute norms in float32 (Llama,
    T5) sum to delta within float32 rounding."""


def _not_checkpointed(model: Model, name: str) -> None:
    if is_checkpointed(model):
        raise ValueError(f"{name} cannot run inside `checkpointed(model)`: its rules record each "
                         "block's forward once, and a checkpointed block runs twice. Call it "
                         "outside the `with` block (it needs one forward, little memory).")


def _stacked(ctx: Context, baseline: Baseline, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """Source and target embeddings of [inputs; references], and the batch row of each."""
    emb = ctx.embedded
    base_src, base_tgt = baselines(ctx, baseline, method)
    n = len(ctx.batch)
    rows = torch.cat([torch.arange(n), torch.arange(n)]).to(emb.source.device)
    return torch.cat([emb.source, base_src]), torch.cat([emb.target, base_tgt]), rows


def _run(ctx, target_fn, source, target, rows):
    """The DeepLIFT forward (rules active): logits [2n tgt vocab], scores [2n step]."""
    with deeplift_rules(ctx.model):
        out, scores = run_scored(ctx, target_fn, source, target, rows)
        return out.logits, scores


@attribution_method(family="gradients", reduction="sum")
def deeplift(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    baseline: Baseline = "auto", multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """DeepLIFT (Shrikumar et al. 2017, arXiv:1704.02685) w.r.t. the input embeddings.

    One forward runs the inputs and the references (`baseline`, as in `integrated_gradients`)
    side by side; one batched backward gives every step's multipliers. With
    `multiply_by_inputs=False` the multipliers are returned. `progress=True` reports the
    forward (inputs and references) on stderr.

    {rules}

    Returns `source` [batch step src hidden], `target` [batch step tgt hidden] and `delta`
    [batch step]: sum of scores minus (f(input) - f(reference)), ~0 (summation-to-delta).
    """
    args = call_args(deeplift, locals())
    _not_checkpointed(model, "deeplift")
    with ExitStack() as stack:
        bar = stack.enter_context(report(progress, "deeplift", unit="forwards"))
        ctx = stack.enter_context(attribution_context(
            model, batch, attribute_target=attribute_target,
            attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end))
        source, target, rows = _stacked(ctx, baseline, "deeplift")
        n = len(ctx.batch)
        bar.expect(len(rows))
        source.requires_grad_()
        target.requires_grad_(ctx.attribute_target)
        logits, raw = _run(ctx, target_fn, source, target, rows)
        scores = raw[:n]
        inputs = [source, target] if ctx.attribute_target else [source]
        grads = [g[:n] for g in step_gradients(scores, inputs)]
        bar.advance(len(rows))
        if multiply_by_inputs:
            grads = [g * (x[:n] - x[n:]).detach()[:, None] for g, x in zip(grads, inputs)]
        out = finish(ctx, method="deeplift", args=args, target_fn=target_fn, source=grads[0],
                     target=grads[1] if ctx.attribute_target else None,
                     step_scores=logit_step_scores(ctx, logits[:n], target_fn, step_scores))
        if not multiply_by_inputs:
            return out
        return _converge.attach(ctx, out, raw[:n].detach(), raw[n:].detach())


def _leaf(a: Tensor, *, role: str, n_src: int, attribute_target: bool) -> Tensor:
    """The layer's output as a leaf; reference rows copy the input rows where not attributed."""
    a = a.detach().clone()
    n = a.shape[0] // 2
    if role == "joint" and not attribute_target:
        a[n:, n_src:] = a[:n, n_src:]
    elif role == "target":
        a[n:, :1] = a[:n, :1]  # the decoder start position is never attributed
    return a.requires_grad_()


@attribution_method(family="layers", reduction="sum")
def layer_deeplift(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    layer: LayerSpec | None = None, baseline: Baseline = "auto", multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Layer DeepLIFT: DeepLIFT multipliers w.r.t. a layer's output times its difference from
    the layer's output at the reference input (`baseline`).

    `layer` as in `layer_gradient_x_activation` (default: the input embeddings, where this equals
    `deeplift`). Positions that are not attributed (target positions without `attribute_target`,
    the decoder start) take the input's activation in the reference too. The scores sum to
    f(input) - f(reference) when the layer cuts the graph (the embeddings, a whole block of a
    decoder-only model or of the encoder); for other layers (an attention module beside its
    residual, a decoder layer whose cross-attention reads the reference's encoder) `delta` says
    how much flows around the layer. `progress` as in `deeplift`.

    {rules}

    Returns `source` [batch step src hidden], `target` [batch step tgt hidden], `delta` [batch step].
    """
    args = call_args(layer_deeplift, locals())
    _not_checkpointed(model, "layer_deeplift")
    with ExitStack() as stack:
        bar = stack.enter_context(report(progress, "layer_deeplift", unit="forwards"))
        ctx = stack.enter_context(attribution_context(
            model, batch, attribute_target=attribute_target,
            attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end))
        hooks = stack.enter_context(layer_hooks(model, _layers.default_layer(model) if layer is None
                                                else layer))
        roles = _layers.roles(model, hooks.modules)
        _layers.check_sides(roles, ctx.attribute_target)
        source, target, rows = _stacked(ctx, baseline, "layer_deeplift")
        n_src, n = ctx.batch.source_ids.shape[1], len(ctx.batch)
        bar.expect(len(rows))
        with deeplift_rules(ctx.model):
            out, leaves, raw = _layers.run_scored(
                ctx, hooks, roles, target_fn, source, target, rows,
                [partial(_leaf, role=r, n_src=n_src, attribute_target=ctx.attribute_target)
                 for r in roles])
        logits, scores = out.logits, raw[:n]
        grads = _layers.split(step_gradients(scores, leaves), roles, n_src, dim=2)
        bar.advance(len(rows))
        acts = _layers.split(leaves, roles, n_src)
        parts = []
        for g, a in ((grads.source, acts.source), (grads.target, acts.target)):
            if g is not None:
                g = g[:n] * (a[:n] - a[n:]).detach()[:, None] if multiply_by_inputs else g[:n]
            parts.append(g)
        out = _layers.finish_layer(ctx, "layer_deeplift", args, target_fn, Acts(*parts, None),
                                   logit_step_scores(ctx, logits[:n], target_fn, step_scores), acts)
        if not multiply_by_inputs:
            return out
        return _converge.attach(ctx, out, raw[:n].detach(), raw[n:].detach())


for _fn in (deeplift, layer_deeplift):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ = _fn.__doc__.format(rules=RULES_DOC)

"""Layer methods: attributions to the output of any module, per source/target position."""

from contextlib import ExitStack
from typing import Literal

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import score_steps, step_gradients
from fnattr.hooks.layer import LayerSpec, layer_hooks
from fnattr.methods import _layers, _triangular
from fnattr.methods._path import adaptive as _adaptive
from fnattr.methods._path import refine as _converge
from fnattr.methods._path import quadrature as _paths
from fnattr.attribution import StepScoreSpec, attribution_context, logit_step_scores
from fnattr.methods._layers import Acts
from fnattr.methods.integrated_gradients import (
    Baseline, adaptive_integrate, baselines, integrate, path_quadrature, path_sums, rule,
)
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _open(stack: ExitStack, model, batch, layer, attribute_target, attr_pos_start, attr_pos_end):
    """Enter the attribution context and the layer hooks; validate the layer's sides."""
    ctx = stack.enter_context(attribution_context(
        model, batch, attribute_target=attribute_target,
        attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end))
    modules = _layers.default_layer(model) if layer is None else layer
    hooks = stack.enter_context(layer_hooks(model, modules))
    roles = _layers.roles(model, hooks.modules)
    _layers.check_sides(roles, ctx.attribute_target)
    return ctx, hooks, roles


@attribution_method(family="layers", reduction="sum")
def layer_gradient_x_activation(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    layer: LayerSpec | None = None, multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Layer gradient x activation: a layer's output times the gradient of each step's target
    w.r.t. it (the gradient alone with `multiply_by_inputs=False`).

    `layer`: a module name (e.g. "model.layers.3"), a module, or one per side for encoder-decoder
    models; default: the input embedding layer(s). Positions of the layer's output map to source
    and target tokens (see `fnattr.methods._layers`). One forward, one batched backward
    (`progress=True` reports it on stderr).

    Returns `source` [batch step src hidden] and `target` [batch step tgt hidden].
    """
    args = call_args(layer_gradient_x_activation, locals())
    with ExitStack() as stack:
        bar = stack.enter_context(report(progress, "layer_gradient_x_activation", unit="forwards"))
        ctx, hooks, roles = _open(stack, model, batch, layer, attribute_target,
                                  attr_pos_start, attr_pos_end)
        emb = ctx.embedded
        bar.expect(len(ctx.batch))
        leaf = lambda a: a.detach().requires_grad_()  # noqa: E731
        out, leaves, scores = _layers.run_scored(ctx, hooks, roles, target_fn, emb.source, emb.target,
                                                 replace=[leaf] * len(roles))
        acts = _layers.split(leaves, roles, ctx.batch.source_ids.shape[1])
        grads = _layers.split(step_gradients(scores, leaves, out.at(ctx.steps)), roles,
                              ctx.batch.source_ids.shape[1], dim=2)
        bar.advance(len(ctx.batch))
        attr = grads
        if multiply_by_inputs:
            attr = Acts(*(None if g is None else g * a.detach()[:, None]
                          for g, a in ((grads.source, acts.source), (grads.target, acts.target))),
                        None)
        return _layers.finish_layer(ctx, "layer_gradient_x_activation", args, target_fn, attr,
                       logit_step_scores(ctx, out.logits, target_fn, step_scores), acts)


def _mix(x: Acts, base: Acts, attribute_target: bool) -> Acts:
    """Baseline activations at attributed positions, actual ones elsewhere (and at the start)."""
    return Acts(base.source, base.target if attribute_target else x.target, x.start)


def _path_names(ctx, x: Acts) -> list[str]:
    """The sides of the layer's output that are attributed (and move along the path)."""
    return [n for n in ("source", "target") if getattr(x, n) is not None
            and (n == "source" or ctx.attribute_target)]


def _path_diffs(ctx, x: Acts, base: Acts) -> list[Tensor | None]:
    """x - baseline per side (source, target) of the layer's output; None where not attributed."""
    names = _path_names(ctx, x)
    return [getattr(x, n) - getattr(base, n) if n in names else None for n in ("source", "target")]


def _layer_nodes(hooks, roles, target_fn, x: Acts, base: Acts) -> _adaptive.Node:
    """Layer IG's nodes: scores and per-step gradients w.r.t. the layer's attributed sides
    (source, target; None where not attributed) at `base + alpha (x - base)` (`alpha` [copies])
    for batch `rows`, through `_triangular` with the layer's outputs replaced."""

    def node(sub, alpha: Tensor, rows: Tensor):
        names = _path_names(sub, x)
        xr, br = x.rows(rows), base.rows(rows)
        path = {n: (getattr(br, n) + alpha.view(-1, *[1] * (getattr(xr, n).ndim - 1))
                    * (getattr(xr, n) - getattr(br, n))).requires_grad_() for n in names}
        acts = Acts(path.get("source", xr.source), path.get("target", xr.target), xr.start)
        emb = sub.embedded
        got = _triangular.gradients(sub, target_fn, emb.source[rows], emb.target[rows],
                                    [path[n] for n in names], rows,
                                    layer=_triangular.Layer(hooks, roles, _layers.join(acts, roles)))
        grads = dict(zip(names, got.grads))
        return got.scores, [grads.get("source"), grads.get("target")]

    return node


@attribution_method(family="layers", reduction="sum")
def layer_integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    layer: LayerSpec | None = None, n_steps: int | Literal["auto"] = "auto",
    tolerance: float = _converge.TOLERANCE, max_steps: int = 128, method: str = "auto",
    internal_batch_size: int = 64, baseline: Baseline = "auto", multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Layer integrated gradients (arXiv:1703.01365 applied to a layer's output, as captum's
    LayerIntegratedGradients): integrate from the layer's output at the `baseline` input to its
    actual output.

    `layer` as in `layer_gradient_x_activation` (default: the input embeddings, where this equals
    `integrated_gradients`). Positions that are not attributed (target positions without
    `attribute_target`, the decoder start) keep their actual activations on the whole path.
    `baseline`, `n_steps` (default "auto": refined per step to `tolerance`, up to `max_steps`),
    `method` (default "auto": "adaptive", each step's mesh halved where its completeness fails,
    with n_steps="auto"; else a quadrature rule), `internal_batch_size`, `progress` as in
    `integrated_gradients`; `meta["completeness"]` too.

    Returns `source` [batch step src hidden], `target` [batch step tgt hidden] and `delta`
    [batch step] (sum of scores minus f(input) - f(baseline layer output)).
    """
    _converge.check_options(n_steps, tolerance, max_steps)
    path_quadrature(n_steps, method, internal_batch_size, adaptive=True)
    args = call_args(layer_integrated_gradients, locals())
    with ExitStack() as stack:
        bar = stack.enter_context(report(progress, "layer_integrated_gradients", unit="forwards"))
        ctx, hooks, roles = _open(stack, model, batch, layer, attribute_target,
                                  attr_pos_start, attr_pos_end)
        emb = ctx.embedded
        base_src, base_tgt = baselines(ctx, baseline)
        with torch.no_grad():
            n_src = ctx.batch.source_ids.shape[1]
            clean, calls = _layers.run(ctx, hooks, roles, emb.source, emb.target)
            logits = clean.logits
            x = _layers.split(calls, roles, n_src)
            base = _layers.split(_layers.run(ctx, hooks, roles, base_src, base_tgt)[1], roles, n_src)
            base = _mix(x, base, ctx.attribute_target)
            f_base = _layers.run_scored(ctx, hooks, roles, target_fn, emb.source, emb.target,
                                        replace=_layers.join(base, roles))[2]
        f_x = score_steps(target_fn, logits, ctx.batch, ctx.steps)
        method = rule(method, n_steps, [getattr(x, n) for n in _path_names(ctx, x)], len(ctx.steps))

        node, diffs = _layer_nodes(hooks, roles, target_fn, x, base), _path_diffs(ctx, x, base)
        like = [getattr(x, n) if d is not None else None for n, d in zip(("source", "target"), diffs)]

        def compute(sub, n, rows, part=None):
            alphas, weights = _paths.quadrature(method, n) if part is None else part
            grads = path_sums(sub, node, like, alphas, weights, internal_batch_size, rows, bar=bar)
            attrs = [None if g is None else g * d[:, None] for g, d in zip(grads, diffs)]
            return (attrs if multiply_by_inputs else grads), attrs

        if method == "adaptive":
            results, delta, record = adaptive_integrate(
                ctx, node, diffs,
                (f_x, f_base), tolerance=tolerance, max_steps=max_steps, chunk=internal_batch_size,
                multiply_by_inputs=multiply_by_inputs, bar=bar)
        else:
            results, delta, record = integrate(ctx, compute, (f_x, f_base), n_steps=n_steps,
                                               tolerance=tolerance, max_steps=max_steps, bar=bar,
                                               method=method)
        out = _layers.finish_layer(ctx, "layer_integrated_gradients", args, target_fn,
                                   Acts(*results, None),
                                   logit_step_scores(ctx, logits, target_fn, step_scores), x)
        if n_steps == "auto":
            _converge.warn_unconverged(ctx, "layer_integrated_gradients", record, max_steps,
                                       also="" if method == "adaptive" else _converge.TRY_ADAPTIVE)
        return out.replace(delta=delta.cpu() if multiply_by_inputs else None,
                           meta={**out.meta, **record})

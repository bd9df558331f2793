"""Integrated gradients over every generated step, with bounded interpolation batches."""

from functools import partial
from typing import Literal

import torch
from torch import Tensor

from fnattr.baselines import Baseline, baselines  # re-exported: the other methods import them here
from fnattr.batch import Batch
from fnattr.methods import _buckets
from fnattr.methods._path import adaptive as _adaptive
from fnattr.methods._path import refine as _converge
from fnattr.methods._path import quadrature as _paths
from fnattr.methods._path.refine import completeness_delta as completeness_delta  # also importable from here
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, finish, logit_step_scores, run_scored,
)
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


# method="auto" takes "adaptive" unless its node gradients would pass this many bytes (about
# (START + 1) nodes per step, each the size of one step's result), then "gausslegendre", whose
# memory is set by `internal_batch_size` (`rule`)
ADAPTIVE_BYTES = 2 * 2**30


def path_quadrature(n_steps: int | str, method: str, internal_batch_size: int, *,
                    adaptive: bool = False) -> tuple[Tensor, Tensor] | None:
    """Points and weights of a path method's rule (its first level for n_steps="auto"), after
    checking its chunk size; None for `method="adaptive"` where the method offers it
    (`adaptive`, also "auto"), which takes n_steps="auto" only."""
    if internal_batch_size < 1:
        raise ValueError(f"`internal_batch_size`={internal_batch_size}: it must be at least 1.")
    if adaptive and method == "auto":
        method = "adaptive" if n_steps == "auto" else "gausslegendre"
    if adaptive and method == "adaptive":
        if n_steps != "auto":
            raise ValueError(f"`n_steps`={n_steps!r}: method='adaptive' places its own points; use "
                             f"n_steps='auto' (`max_steps` caps them), or a fixed rule {list(_paths.RULES)}.")
        return None
    if adaptive and method not in _paths.RULES:
        raise ValueError(f"`method`={method!r}: use 'auto', 'adaptive' or a quadrature rule "
                         f"{list(_paths.RULES)}.")
    return _paths.quadrature(method, _converge.AUTO_START if n_steps == "auto" else n_steps)


def rule(method: str, n_steps: int | str, sides: list[Tensor | None], n_steps_attributed: int) -> str:
    """The rule that `method` names: for "auto", "adaptive" with n_steps="auto" where its node
    gradients (`_adaptive.START` + 1 per step to begin with, each as large as one step's result
    for `sides`, the attributed inputs [batch pos *]) stay under `ADAPTIVE_BYTES`, else
    "gausslegendre"."""
    if method != "auto":
        return method
    if n_steps != "auto":
        return "gausslegendre"
    per_step = sum(t.numel() * t.element_size() for t in sides if t is not None)
    nodes = (_adaptive.START + 1) * n_steps_attributed * per_step
    return "adaptive" if nodes <= ADAPTIVE_BYTES else "gausslegendre"


def path_sums(ctx: Context, node: _adaptive.Node, like: list[Tensor | None], alphas: Tensor,
              weights: Tensor, chunk: int, rows=None, *, bar: Reporter) -> list[Tensor | None]:
    """sum_a w_a * the gradients that `node` gives at alpha a, per side `[batch, step, ...]`
    (None where `like`, the side's input `[batch pos *]`, is None), chunked over rows of like
    length (`_buckets`; `rows`: the batch rows to integrate, default all; the others stay zero).
    `bar` counts the forwards (one per point and row).

    One chunk's graph is alive at a time, so peak memory does not grow with `n_steps`."""
    acc = [None if t is None else torch.zeros(len(ctx.batch), len(ctx.steps), *t.shape[1:],
                                              dtype=t.dtype, device=t.device) for t in like]
    first = next(t for t in like if t is not None)
    rows = range(len(ctx.batch)) if rows is None else rows
    bar.expect(len(alphas) * len(rows))
    for pairs in _buckets.chunks(ctx.batch, list(rows), len(alphas), chunk):
        a_idx, part = (torch.tensor(v, device=first.device) for v in zip(*pairs))
        grads = node(ctx, alphas.to(first)[a_idx], part)[1]
        w = weights.to(first)[a_idx]
        for total, g in zip(acc, grads):
            if total is not None:
                total.index_add_(0, part, g * w.view(-1, *[1] * (g.ndim - 1)))
        del grads  # this chunk's graph goes before the next forward
        bar.advance(len(part))
    return acc


def path_level(ctx: Context, target_fn: TargetFn, x, base, method: str, chunk: int,
               multiply_by_inputs: bool, *, bar: Reporter) -> _converge.LevelFn:
    """IG with n points of `method` at some rows and steps (or only the points `part`, a nested
    level's new ones): (results, attributions) per side; its forwards counted on `bar`."""
    diffs = [t - b for t, b in zip(x, base)]
    node = _adaptive.ig_node(target_fn, x, base)

    def compute(sub: Context, n: int, rows: list[int], part: tuple[Tensor, Tensor] | None = None):
        alphas, weights = _paths.quadrature(method, n) if part is None else part
        like = [x[0], x[1] if sub.attribute_target else None]
        grads = path_sums(sub, node, like, alphas, weights, chunk, rows, bar=bar)
        attrs = [None if g is None else g * d[:, None] for g, d in zip(grads, diffs)]
        return (attrs if multiply_by_inputs else grads), attrs

    return compute


def integrate(ctx: Context, compute: _converge.LevelFn, ends: tuple[Tensor, Tensor], *,
              n_steps: int | str, tolerance: float, max_steps: int, bar: Reporter,
              start: int = _converge.AUTO_START, unit: str = "points", method: str | None = None):
    """Results of a path method at `n_steps` points, or refined per step ("auto"); its `delta`
    [batch step] and `meta["completeness"]`. `ends` = (f(x), f(baseline)) [batch step]. `bar`
    shows the points ("16 points", `unit` naming them); `compute` counts its forwards there.
    With the quadrature `method` named (and `compute` taking `part`), "auto" reuses the last
    level's points where the rule nests (`_paths.next_level`)."""
    f_x, f_base = ends
    expected = f_x - f_base
    if n_steps == "auto":
        results, delta, points = _converge.refine(ctx, compute, expected, f_x, f_base,
                                                  tolerance=tolerance, max_steps=max_steps,
                                                  reporter=bar, start=start, unit=unit,
                                                  nest=method and partial(_paths.next_level, method))
    else:
        bar.update(detail=f"{n_steps} {unit}")
        results, attrs = compute(ctx, n_steps, list(range(len(ctx.batch))))
        delta = _converge.step_sums(ctx, attrs) - expected
        points = n_steps
    delta = delta * ctx.batch.target_mask[:, ctx.steps]
    return results, delta, _converge.record(ctx, delta, expected, f_x, f_base, tolerance, points, method)


def adaptive_integrate(ctx: Context, node: _adaptive.Node, diffs: list[Tensor | None],
                       ends: tuple[Tensor, Tensor], *, tolerance: float, max_steps: int, chunk: int,
                       multiply_by_inputs: bool, bar: Reporter):
    """A path method with `method="adaptive"` (`_adaptive`; its gradients from `node`, `diffs` =
    x - baseline per side, None where a side does not move): results per side, `delta`
    [batch step] and `meta["completeness"]`, as `integrate` gives them."""
    f_x, f_base = ends
    expected = f_x - f_base
    grads, points = _adaptive.integrate(
        ctx, node, diffs, expected, f_base,
        _converge.allowed_error(expected, f_x, f_base, tolerance),
        max_steps=max_steps, chunk=chunk, reporter=bar)
    attrs = [None if g is None else g * d[:, None] for g, d in zip(grads, diffs)]
    delta = (_converge.step_sums(ctx, attrs) - expected) * ctx.batch.target_mask[:, ctx.steps]
    record = _converge.record(ctx, delta, expected, f_x, f_base, tolerance, points, "adaptive")
    return (attrs if multiply_by_inputs else grads), delta, record


@attribution_method(family="gradients", reduction="sum")
def integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int | Literal["auto"] = "auto", tolerance: float = _converge.TOLERANCE,
    max_steps: int = 128, method: str = "auto",
    internal_batch_size: int = 64, baseline: Baseline = "auto",
    multiply_by_inputs: bool = True, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Integrated gradients (Sundararajan et al. 2017, arXiv:1703.01365) for every step.

    The path from `baseline` to the input embeddings is integrated to a completeness target:
    with `n_steps="auto"` and `method="auto"` (the defaults) each step's points go where its
    integrand is sharp (`method="adaptive"`, `fnattr.methods._path.adaptive`): the intervals of its
    mesh whose own completeness error is largest are halved until |delta| is at most `tolerance`
    times |f(x) - f(baseline)|, up to `max_steps` points per step. It keeps a step's node
    gradients until that step is done, so "auto" takes Gauss-Legendre instead where they would
    pass `ADAPTIVE_BYTES`. A quadrature rule `method` ("gausslegendre", "riemann_*") with
    n_steps="auto" gives each step 8, 16, 32, ... points (riemann_trapezoid: 8, 15, 29, ...) until
    it meets the tolerance (riemann_left, riemann_right and riemann_trapezoid reuse the last
    level's points); a number `n_steps` uses that many points of the rule (Gauss-Legendre for
    "auto"). Steps that miss the tolerance are named in one `ConvergenceWarning`. Every result
    records the tolerance, each step's relative error, the unconverged steps, the points used
    and the rule in `meta["completeness"]`. `internal_batch_size` bounds how many interpolated
    sequences run in one forward, so memory stays flat as `n_steps` grows. Baselines: "auto" (the default: UNK, pad or
    the zero vector, whichever `fnattr.baselines.resolve_baseline` finds neutral for this
    tokenizer; `meta["baseline"]` names it), "unk", "pad", "zeros", or a source tensor
    [batch src d] (the target side then uses "auto"). Special tokens keep their embedding.
    `progress=True` shows the points and forwards done on stderr (`fnattr.progress`).

    Returns `source` [batch step src hidden], `target` [batch step tgt hidden] for earlier
    generated tokens, and `delta` [batch step]: sum of scores minus (f(input) - f(baseline)).

    >>> out = integrated_gradients(model, batch, probability, n_steps=50)
    >>> out.delta.abs().max()   # completeness error
    """
    _converge.check_options(n_steps, tolerance, max_steps)
    path_quadrature(n_steps, method, internal_batch_size, adaptive=True)
    args = call_args(integrated_gradients, locals())
    with (report(progress, "integrated_gradients", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, baseline)
        with torch.no_grad():
            ends = [run_scored(ctx, target_fn, s, t) for s, t in (x, base)]
        method = rule(method, n_steps, [x[0], x[1] if ctx.attribute_target else None], len(ctx.steps))
        if method == "adaptive":
            diffs = [x[0] - base[0], x[1] - base[1] if ctx.attribute_target else None]
            results, delta, record = adaptive_integrate(
                ctx, _adaptive.ig_node(target_fn, x, base), diffs, (ends[0][1], ends[1][1]),
                tolerance=tolerance,
                max_steps=max_steps, chunk=internal_batch_size, multiply_by_inputs=multiply_by_inputs,
                bar=bar)
        else:
            compute = path_level(ctx, target_fn, x, base, method, internal_batch_size,
                                 multiply_by_inputs, bar=bar)
            results, delta, record = integrate(ctx, compute, (ends[0][1], ends[1][1]), n_steps=n_steps,
                                               tolerance=tolerance, max_steps=max_steps, bar=bar,
                                               method=method)
        out = finish(ctx, method="integrated_gradients", args=args, target_fn=target_fn,
                     source=results[0], target=results[1], step_scores=logit_step_scores(
                         ctx, ends[0][0].logits, target_fn, step_scores))
        if n_steps == "auto":
            _converge.warn_unconverged(ctx, "integrated_gradients", record, max_steps,
                                       also="" if method == "adaptive" else _converge.TRY_ADAPTIVE)
        return out.replace(delta=delta.cpu() if multiply_by_inputs else None,
                           meta={**out.meta, **record})


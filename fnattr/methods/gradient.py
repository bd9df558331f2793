"""Saliency and input x gradient: one forward and batched backwards for all steps."""

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.methods import _buckets, _triangular
from fnattr.attribution import Context, StepScoreSpec, attribution_context, finish, logit_step_scores
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _gradients(ctx: Context, target_fn: TargetFn, step_scores: StepScoreSpec, bar: Reporter):
    """Per-step gradients at the actual input, and the step scores of that same forward (its
    rows counted on `bar` once their backward is done). Rows of very different lengths run in
    buckets of like length (`_buckets`), each without the columns its rows leave padded."""
    emb, n_rows = ctx.embedded, len(ctx.batch)
    bar.expect(n_rows)
    parts = _buckets.buckets(ctx.batch, list(range(n_rows)), 1, n_rows, min_copies=1)
    logits, grads = None, None
    for part in parts:
        rows = None if len(parts) == 1 else torch.tensor(part, device=emb.source.device)
        src = (emb.source if rows is None else emb.source[rows]).clone().requires_grad_()
        tgt = (emb.target if rows is None else emb.target[rows]).clone().requires_grad_(ctx.attribute_target)
        inputs = [src, tgt] if ctx.attribute_target else [src]
        scored = _triangular.gradients(ctx, target_fn, src, tgt, inputs, rows)
        if rows is None:
            logits, grads = scored.logits, scored.grads
        else:
            if grads is None:
                logits = scored.logits.new_zeros(n_rows, *scored.logits.shape[1:])
                grads = [g.new_zeros(n_rows, *g.shape[1:]) for g in scored.grads]
            logits[rows] = scored.logits.detach()
            for total, g in zip(grads, scored.grads):
                total[rows] = g
        del scored
        bar.advance(len(part))
    grad_tgt = grads[1] if ctx.attribute_target else None
    return grads[0], grad_tgt, logit_step_scores(ctx, logits, target_fn, step_scores)


def _times(grad: Tensor | None, x: Tensor) -> Tensor | None:
    return None if grad is None else grad * x[:, None]


@attribution_method(family="gradients", reduction="l2")
def saliency(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    abs: bool = True, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Saliency (Simonyan et al. 2013, arXiv:1312.6034): gradient of each step's target w.r.t.
    the input embeddings, absolute value by default.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden] for the
    earlier generated tokens). One forward and one batched backward serve every step
    (`progress=True` reports it on stderr).

    >>> out = saliency(model, prepare(model, tok, "The capital of France is"))
    """
    args = call_args(saliency, locals())
    with (report(progress, "saliency", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        g_src, g_tgt, scores = _gradients(ctx, target_fn, step_scores, bar)
        if abs:
            g_src, g_tgt = g_src.abs(), None if g_tgt is None else g_tgt.abs()
        return finish(ctx, method="saliency", args=args, target_fn=target_fn,
                      source=g_src, target=g_tgt, step_scores=scores)


@attribution_method(family="gradients", reduction="sum")
def input_x_gradient(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Input x gradient (Shrikumar et al. 2016, arXiv:1605.01713): embedding times the gradient
    of each step's target w.r.t. it.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]).
    `progress=True` reports the forward on stderr.
    """
    args = call_args(input_x_gradient, locals())
    with (report(progress, "input_x_gradient", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        g_src, g_tgt, scores = _gradients(ctx, target_fn, step_scores, bar)
        return finish(ctx, method="input_x_gradient", args=args, target_fn=target_fn,
                      source=_times(g_src, ctx.embedded.source),
                      target=_times(g_tgt, ctx.embedded.target), step_scores=scores)

"""Sequential integrated gradients: one token at a time on its path, the others kept as they are."""

import torch

from fnattr.batch import Batch
from fnattr.engine import step_gradients
from fnattr.methods._common import (
    Context, StepScoreSpec, attribution_context, clean_logits, finish, logit_step_scores, run_scored,
)
from fnattr.methods.integrated_gradients import Baseline, baselines, path_quadrature
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _jobs(ctx: Context) -> list[tuple[int, int, int]]:
    """(side, row, position) of every token to interpolate: real, non-special, and fed."""
    b, jobs = ctx.batch, []
    sides = [("source", b.source_mask & ~b.source_special)]
    if ctx.attribute_target:
        fed = b.target_mask & ~b.target_special
        fed[:, -1] = False  # the last target token is never an input
        sides.append(("target", fed))
    for side, (_, keep) in enumerate(sides):
        for r, p in keep.nonzero().tolist():
            jobs.append((side, r, p))
    return jobs


def _sig_grads(ctx, target_fn, x, base, alphas, weights, chunk):
    """For each token p: sum_a w_a * grad_p f_step(x with token p at base_p + a (x_p - base_p))."""
    dev, n_steps = x[0].device, len(ctx.steps)
    acc = [torch.zeros(len(ctx.batch), n_steps, *t.shape[1:], dtype=t.dtype, device=dev) for t in x]
    work = [(j, a) for j in _jobs(ctx) for a in range(len(alphas))]
    alphas, weights = alphas.to(x[0]), weights.to(x[0])
    for lo in range(0, len(work), chunk):
        part = work[lo:lo + chunk]
        side, rows, pos = (torch.tensor(v, device=dev) for v in zip(*[j for j, _ in part]))
        a_idx = torch.tensor([a for _, a in part], device=dev)
        emb = [t[rows].clone() for t in x]
        i = torch.arange(len(part), device=dev)
        tok = [t[rows, pos.clamp(max=t.shape[1] - 1)] for t in x]
        btok = [t[rows, pos.clamp(max=t.shape[1] - 1)] for t in base]
        x_tok = torch.where((side == 0)[:, None], tok[0], tok[1])
        b_tok = torch.where((side == 0)[:, None], btok[0], btok[1])
        leaf = (b_tok + alphas[a_idx][:, None] * (x_tok - b_tok)).requires_grad_()
        for s in (0, 1):
            sel = side == s
            if sel.any():
                emb[s][i[sel], pos[sel]] = leaf[sel]
        out, scores = run_scored(ctx, target_fn, emb[0], emb[1], rows)
        (grad,) = step_gradients(scores, [leaf], out.at(ctx.steps))
        del out  # this chunk's graph goes before the next forward
        contrib = grad * weights[a_idx][:, None, None]  # [job step d]
        for s in (0, 1):
            sel = side == s
            if sel.any():
                acc[s].transpose(1, 2).index_put_((rows[sel], pos[sel]), contrib[sel], accumulate=True)
    return acc


def sequential_integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int = 32, method: str = "gausslegendre", internal_batch_size: int = 64,
    baseline: Baseline = "auto", multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (),
) -> AttributionTensors:
    """Sequential integrated gradients (Enguehard 2023, arXiv:2305.15853): for each token, IG
    along the path that moves that token alone from its baseline to its embedding while every
    other token keeps its value. Its scores sum to f(x) - f(x with that token at its baseline).

    One forward per (token, path point), shared by every generated step (causal masking), works
    for decoder-only and encoder-decoder models, forced or generated targets, and target tokens
    with `attribute_target=True`. Options as in `integrated_gradients`; the cost is about the
    number of attributed tokens times IG's.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]).
    """
    alphas, weights = path_quadrature(n_steps, method, internal_batch_size)
    args = {"n_steps": n_steps, "method": method, "internal_batch_size": internal_batch_size,
            "baseline": baseline, "multiply_by_inputs": multiply_by_inputs,
            "attribute_target": attribute_target, "attr_pos_start": attr_pos_start,
            "attr_pos_end": attr_pos_end}
    with attribution_context(model, batch, attribute_target=attribute_target,
                             attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx:
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, baseline)
        grads = _sig_grads(ctx, target_fn, x, base, alphas, weights, internal_batch_size)
        if multiply_by_inputs:
            grads = [g * (t - b)[:, None] for g, t, b in zip(grads, x, base)]
        logits = clean_logits(ctx)
        return finish(ctx, method="sequential_integrated_gradients", args=args, target_fn=target_fn,
                      source=grads[0], target=grads[1] if ctx.attribute_target else None,
                      step_scores=logit_step_scores(ctx, logits, target_fn, step_scores))


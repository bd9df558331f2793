"""Integrated gradients over every generated step, with bounded interpolation batches."""

import torch
from jaxtyping import Float
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import forward, run, score_steps, step_gradients
from fnattr.methods import _paths
from fnattr.methods._common import Context, StepScoreSpec, attribution_context, finish, logit_step_scores
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

# "unk" | "pad" | "zeros" | a tensor; checked by `baselines` with an error that names the fix.
Baseline = str | Float[Tensor, "batch src d"]


def _fill(ctx: Context, side: str, emb: Tensor, kind: str) -> Tensor:
    """Baseline embeddings for one side: `kind` at ordinary tokens, specials kept as they are."""
    ids, special = getattr(ctx.batch, f"{side}_ids"), getattr(ctx.batch, f"{side}_special")
    if kind == "zeros":
        fill = torch.zeros_like(emb)
    else:
        token = ctx.batch.unk_id if kind == "unk" and ctx.batch.unk_id is not None else ctx.batch.pad_id
        with torch.no_grad():
            fill = ctx.handle.embed(torch.full_like(ids, token), side)
    return torch.where(special[..., None], emb, fill)


def baselines(ctx: Context, baseline: Baseline) -> tuple[Tensor, Tensor]:
    """Source and target baselines. A tensor sets the source side; the target side uses "unk"."""
    emb = ctx.embedded
    if isinstance(baseline, Tensor):
        if baseline.shape != emb.source.shape:
            raise ValueError(f"`baseline` has shape {tuple(baseline.shape)}; the source embeddings "
                             f"have {tuple(emb.source.shape)}: pass one of that shape.")
        src = baseline.to(emb.source)
    elif baseline in ("unk", "pad", "zeros"):
        src = _fill(ctx, "source", emb.source, baseline)
    else:
        raise ValueError(f"`baseline`={baseline!r}: use 'unk', 'pad', 'zeros' or a tensor.")
    kind = baseline if isinstance(baseline, str) else "unk"
    tgt = _fill(ctx, "target", emb.target, kind) if ctx.attribute_target else emb.target
    return src, tgt


def path_quadrature(n_steps: int, method: str, internal_batch_size: int) -> tuple[Tensor, Tensor]:
    """Points and weights of a path method's rule, after checking its chunk size."""
    if internal_batch_size < 1:
        raise ValueError(f"`internal_batch_size`={internal_batch_size}: it must be at least 1.")
    return _paths.quadrature(method, n_steps)


def _chunk_grads(ctx, target_fn, x, base, alpha, rows):
    """Per-step gradients at `base + alpha (x - base)` for `rows`; its autograd graph dies here."""
    path = [(b[rows] + alpha * (t[rows] - b[rows])).requires_grad_() for t, b in zip(x, base)]
    tgt = path[1] if ctx.attribute_target else x[1][rows]
    out = run(ctx.model, ctx.batch, ctx.handle, path[0], tgt, ctx.embedded.start, rows)
    scores = score_steps(target_fn, out.logits, ctx.batch, ctx.steps, rows)
    return step_gradients(scores, path if ctx.attribute_target else path[:1], out.at(ctx.steps))


def _path_grads(ctx, target_fn, x, base, alphas, weights, chunk):
    """sum_a w_a * grad f_step(base + a (x - base)), for source and target, chunked over rows.

    One chunk's graph is alive at a time, so peak memory does not grow with `n_steps`."""
    n_rows, acc = len(ctx.batch), [torch.zeros(len(ctx.batch), len(ctx.steps), *t.shape[1:],
                                               dtype=t.dtype, device=t.device) for t in x]
    pairs = [(a, r) for a in range(len(alphas)) for r in range(n_rows)]
    for lo in range(0, len(pairs), chunk):
        a_idx, rows = (torch.tensor(v, device=x[0].device) for v in zip(*pairs[lo:lo + chunk]))
        alpha = alphas.to(x[0])[a_idx][:, None, None]
        grads = _chunk_grads(ctx, target_fn, x, base, alpha, rows)
        w = weights.to(x[0])[a_idx][(..., *(None,) * (grads[0].ndim - 1))]
        for total, g in zip(acc, grads):
            total.index_add_(0, rows, g * w)
        del grads
    return acc


def integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int = 32, method: str = "gausslegendre",
    internal_batch_size: int = 64, baseline: Baseline = "unk",
    multiply_by_inputs: bool = True, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (),
) -> AttributionTensors:
    """Integrated gradients (Sundararajan et al. 2017, arXiv:1703.01365) for every step.

    The path from `baseline` to the input embeddings is integrated with `n_steps` points of the
    quadrature `method`; `internal_batch_size` bounds how many interpolated sequences run in one
    forward, so memory stays flat as `n_steps` grows. Baselines: "unk" (UNK embedding at every
    ordinary token, BOS/EOS/pad kept; pad when the tokenizer has no UNK), "pad", "zeros", or a
    source tensor [batch src d] (the target side then uses "unk").

    Returns `source` [batch step src hidden], `target` [batch step tgt hidden] for earlier
    generated tokens, and `delta` [batch step]: sum of scores minus (f(input) - f(baseline)).

    >>> out = integrated_gradients(model, batch, probability, n_steps=50)
    >>> out.delta.abs().max()   # completeness error
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
        grads = _path_grads(ctx, target_fn, x, base, alphas, weights, internal_batch_size)
        with torch.no_grad():
            ends = [forward(ctx.model, ctx.batch, ctx.handle, s, t, ctx.embedded.start)
                    for s, t in (x, base)]
        scores = logit_step_scores(ctx, ends[0], target_fn, step_scores)
        f_x, f_base = (score_steps(target_fn, lg, ctx.batch, ctx.steps) for lg in ends)
        diffs = [t - b for t, b in zip(x, base)]
        attr = [g * d[:, None] if multiply_by_inputs else g for g, d in zip(grads, diffs)]
        out = finish(ctx, method="integrated_gradients", args=args, target_fn=target_fn,
                     source=attr[0], target=attr[1] if ctx.attribute_target else None,
                     step_scores=scores)
        if not multiply_by_inputs:
            return out
        return out.replace(delta=completeness_delta(out, (f_x - f_base).cpu()))


def completeness_delta(out: AttributionTensors, expected: Tensor) -> Tensor:
    """Sum of every score of each step minus `expected` (f(input) - f(baseline)); 0 at padding."""
    total = out.source.flatten(2).sum(-1)
    if out.target is not None:
        total = total + out.target.flatten(2).sum(-1)
    return (total - expected) * out.step_mask

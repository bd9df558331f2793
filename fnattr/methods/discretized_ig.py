"""Discretized integrated gradients: monotonic paths through real vocabulary embeddings."""

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import forward, run, score_steps, step_gradients
from fnattr.methods import _paths
from fnattr.methods._common import Context, StepScoreSpec, attribution_context, finish, logit_step_scores
from fnattr.methods.integrated_gradients import Baseline, baselines, completeness_delta
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

Strategy = Literal["greedy", "maxcount"]


def vocabulary(ctx: Context, side: str) -> Float[Tensor, "vocab d"]:
    """Every token's embedding as the model computes it on `side` (scaled embeddings included)."""
    module = ctx.handle.modules[side]
    n = getattr(module, "num_embeddings", None) or module.weight.shape[0]
    with torch.no_grad():
        return ctx.handle.embed(torch.arange(n, device=ctx.embedded.source.device)[None], side)[0]


def monotonic_paths(
    x: Float[Tensor, "pos d"], base: Float[Tensor, "pos d"], ids: Int[Tensor, " pos"],
    vocab: Float[Tensor, "vocab d"], *, n_steps: int, n_neighbors: int, strategy: Strategy,
) -> tuple[Float[Tensor, "pos point d"], Int[Tensor, "pos anchor"]]:
    """Paths base = p_0, ..., p_n_steps = x, monotonic in every dimension, and their anchors.

    Built from x backwards: the candidates are the `n_neighbors` nearest vocabulary embeddings
    of x (one kNN for all positions, in torch). At each step, among the unused candidates, pick
    the one whose "monotonized" copy changes least (greedy) or that is monotonic in most
    dimensions (maxcount); monotonized: the dimensions outside the box between the baseline and
    the current point move to 1/r of the way to the baseline (r: segments left). The next point
    is that copy, so it stays in the box and the path is monotonic.
    """
    n_pos, n_anchor = x.shape[0], n_steps - 1
    dist = torch.cdist(x, vocab)
    dist[torch.arange(n_pos), ids] = float("inf")  # the word itself is no anchor
    k = min(max(n_neighbors, n_anchor), vocab.shape[0] - 1)
    cands = dist.topk(k, largest=False).indices  # [pos k]
    emb = vocab[cands]  # [pos k d]
    used = torch.zeros(n_pos, k, dtype=torch.bool, device=x.device)
    points, anchors, cur = [x], [], x
    for step in range(n_anchor):
        left = n_steps - step
        lo, hi = torch.minimum(base, cur)[:, None], torch.maximum(base, cur)[:, None]
        mono = (emb >= lo) & (emb <= hi)
        fallback = (cur - (cur - base) / left)[:, None].expand_as(emb)
        moved = torch.where(mono, emb, fallback)
        if strategy == "greedy":
            cost = (moved - emb).norm(dim=-1)
        elif strategy == "maxcount":
            cost = -mono.sum(-1).to(emb.dtype)
        else:
            raise ValueError(f"`strategy`={strategy!r}: use 'greedy' or 'maxcount'.")
        pick = cost.masked_fill(used, float("inf")).argmin(-1)
        used[torch.arange(n_pos), pick] = True
        anchors.append(cands[torch.arange(n_pos), pick])
        cur = moved[torch.arange(n_pos), pick]
        points.append(cur)
    points.append(base)
    return torch.stack(points[::-1], 1), torch.stack(anchors[::-1], 1)


def _side_paths(ctx, side, x, base, keep, n_steps, n_neighbors, strategy):
    """Paths [batch pos point d] for one side; positions not in `keep` stay at x."""
    ids = getattr(ctx.batch, f"{side}_ids")
    paths = x[:, :, None].expand(-1, -1, n_steps + 1, -1).clone()
    if keep.any():
        got, _ = monotonic_paths(x[keep], base[keep], ids[keep], vocabulary(ctx, side), n_steps=n_steps,
                                 n_neighbors=n_neighbors, strategy=strategy)
        paths[keep] = got
    return paths


def _dig_grads(ctx, target_fn, paths, per_segment, chunk):
    """sum_k sum_j w_j grad f_step(p_k + a_j (p_k+1 - p_k)) * (p_k+1 - p_k): Gauss-Legendre with
    `per_segment` points on each linear segment, chunked over (segment, point, row)."""
    sides = [0, 1] if ctx.attribute_target else [0]
    n_rows, n_seg = len(ctx.batch), paths[0].shape[2] - 1
    alphas, weights = (t.to(paths[0]) for t in _paths.quadrature("gausslegendre", per_segment))
    acc = [torch.zeros(n_rows, len(ctx.steps), *paths[i].shape[1:2], paths[i].shape[-1],
                       dtype=paths[i].dtype, device=paths[i].device) for i in sides]
    work = [(k, j, r) for k in range(n_seg) for j in range(per_segment) for r in range(n_rows)]
    for lo in range(0, len(work), chunk):
        k, j, rows = (torch.tensor(v, device=paths[0].device) for v in zip(*work[lo:lo + chunk]))
        segs = [p[rows, :, k + 1] - p[rows, :, k] for p in paths]  # [m pos d]
        at = [(p[rows, :, k] + alphas[j][:, None, None] * sg).requires_grad_(i in sides)
              for i, (p, sg) in enumerate(zip(paths, segs))]
        out = run(ctx.model, ctx.batch, ctx.handle, at[0], at[1], ctx.embedded.start, rows)
        grads = step_gradients(score_steps(target_fn, out.logits, ctx.batch, ctx.steps, rows),
                               [at[i] for i in sides], out.at(ctx.steps))
        del out  # this chunk's graph goes before the next forward
        for total, g, i in zip(acc, grads, sides):
            total.index_add_(0, rows, g * (segs[i] * weights[j][:, None, None])[:, None])
    return acc


def discretized_integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int = 32, strategy: Strategy = "greedy", n_neighbors: int = 64,
    points_per_segment: int = 1, internal_batch_size: int = 64, baseline: Baseline = "unk",
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (),
) -> AttributionTensors:
    """Discretized integrated gradients (Sanyal & Ren 2021, arXiv:2108.13654): each token moves
    from its baseline to its embedding along a monotonic path whose `n_steps - 1` inner points
    are anchored on nearby vocabulary embeddings (`strategy` "greedy" or "maxcount", among the
    `n_neighbors` nearest; see `monotonic_paths`). The integral along each linear segment uses
    `points_per_segment` Gauss-Legendre points (1: the midpoint), so the cost is
    `n_steps * points_per_segment` forwards, `n_steps` like `integrated_gradients` by default;
    more points per segment make `delta` go to 0. The kNN is one `torch.cdist` per side and
    batch. Special tokens keep their embedding.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]); `delta`
    [batch step]: sum of scores minus (f(input) - f(baseline)).
    """
    if n_steps < 2 or internal_batch_size < 1 or points_per_segment < 1:
        raise ValueError(f"`n_steps`={n_steps}, `points_per_segment`={points_per_segment}, "
                         f"`internal_batch_size`={internal_batch_size}: use n_steps >= 2 and the "
                         "others >= 1.")
    args = {"n_steps": n_steps, "strategy": strategy, "n_neighbors": n_neighbors,
            "points_per_segment": points_per_segment, "internal_batch_size": internal_batch_size,
            "baseline": baseline,
            "attribute_target": attribute_target, "attr_pos_start": attr_pos_start,
            "attr_pos_end": attr_pos_end}
    with attribution_context(model, batch, attribute_target=attribute_target,
                             attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx:
        b = ctx.batch
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, baseline)
        keep_src = b.source_mask & ~b.source_special & (x[0] != base[0]).any(-1)
        keep_tgt = (b.target_mask & ~b.target_special & (x[1] != base[1]).any(-1)
                    & ctx.attribute_target)
        paths = [_side_paths(ctx, "source", x[0], base[0], keep_src, n_steps, n_neighbors, strategy),
                 _side_paths(ctx, "target", x[1], base[1], keep_tgt, n_steps, n_neighbors, strategy)]
        attr = _dig_grads(ctx, target_fn, paths, points_per_segment, internal_batch_size)
        with torch.no_grad():
            ends = [forward(ctx.model, ctx.batch, ctx.handle, s, t, ctx.embedded.start)
                    for s, t in (x, (paths[0][:, :, 0], paths[1][:, :, 0]))]
        out = finish(ctx, method="discretized_integrated_gradients", args=args, target_fn=target_fn,
                     source=attr[0], target=attr[1] if ctx.attribute_target else None,
                     step_scores=logit_step_scores(ctx, ends[0], target_fn, step_scores))
        f_x, f_base = (score_steps(target_fn, lg, ctx.batch, ctx.steps) for lg in ends)
        return out.replace(delta=completeness_delta(out, (f_x - f_base).cpu()))

"""Occlusion: the drop of every step's score when a token (or a window of tokens) is replaced.

One forward per occluded window serves every step at once: causal masking makes the logits of
step t exactly those of a per-step run, so a window that step t cannot see changes nothing for it.
Occluded copies of the batch rows run `internal_batch_size` at a time (`engine.forward`'s `rows`).
"""

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import score_steps
from fnattr import group_features as _grouped
from fnattr.methods import _prefix
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, clean_logits, finish, logit_step_scores,
    perturbed_inputs, run_scored,
)
from fnattr.methods.integrated_gradients import baselines
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import OFF, Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

Fill = Literal["auto", "unk", "pad", "zeros"]


def occludable(ctx: Context) -> tuple[Bool[Tensor, "batch src"], Bool[Tensor, "batch tgt"]]:
    """Tokens that can be occluded: real, not special (BOS/EOS keep their embedding), and, on the
    target side, inputs of some real attributed step of their row (token j feeds steps after j)."""
    batch = ctx.batch
    src = batch.source_mask & ~batch.source_special
    j = torch.arange(batch.target_ids.shape[1], device=batch.target_ids.device)
    real_steps = batch.target_mask[:, ctx.steps]  # [batch step]
    feeds = ((ctx.steps[None, :] > j[:, None])[None] & real_steps[:, None, :]).any(-1)
    tgt = batch.target_mask & ~batch.target_special & feeds
    return src, tgt & ctx.attribute_target


def windows(n: int, window: int, stride: int) -> list[range]:
    """Windows of `window` consecutive items among `n`, every `stride`; the last ends at n."""
    if n == 0:
        return []
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [range(s, min(s + window, n)) for s in starts]


def perturbed_scores(
    ctx: Context, target_fn: TargetFn, rows: Int[Tensor, " n"],
    masks: tuple[Bool[Tensor, "n src *d"], Bool[Tensor, "n tgt *d"]],
    fills: tuple[Tensor, Tensor], chunk: int, *, bar: Reporter = OFF,
    clean: _prefix.Prefix | None | Literal["auto"] = "auto",
) -> Float[Tensor, "n step"]:
    """Every step's score for copies of batch `rows` whose masked tokens (or, with masks
    [n pos d], masked embedding coordinates) read the `fills` embeddings; at most `chunk` copies
    per forward, each counted on `bar`. Decoder-only copies run from their first changed
    position on the clean input's key/value cache where that is exact (`_prefix`; `clean`: that
    cache if the caller has it, "auto" to make it here)."""
    if isinstance(clean, str):  # "auto"
        clean = _prefix.prefix(ctx, target_fn, masks)
    if clean is not None:
        return _prefix.perturbed_scores(ctx, clean, target_fn, rows, masks, fills, chunk, bar=bar)
    emb = ctx.embedded
    out = [emb.source.new_zeros(0, len(ctx.steps))]
    bar.expect(len(rows))
    with torch.no_grad():
        for lo in range(0, len(rows), chunk):
            r = rows[lo:lo + chunk]
            inputs = perturbed_inputs(ctx, masks, fills, slice(lo, lo + chunk), r)
            out.append(run_scored(ctx, target_fn, *inputs, r)[1])
            bar.advance(len(r))
    return torch.cat(out)


def _occlusions(ctx: Context, window: int, stride: int, dims: tuple[int, int] | None = None):
    """(row, source mask, target mask) of every window to occlude, as tensors: masks [n pos], or
    [n pos d] with `dims` = (window, stride) over the embedding dimensions."""
    sides = occludable(ctx)
    d = ctx.embedded.source.shape[-1]
    blocks = [None] if dims is None else [slice(r.start, r.stop) for r in windows(d, *dims)]
    rows, masks = [], ([], [])
    for b in range(len(ctx.batch)):
        for side, can in enumerate(sides):
            positions = can[b].nonzero().squeeze(1)
            for w in windows(len(positions), window, stride):
                for block in blocks:
                    shape = () if block is None else (d,)
                    mask = [s.new_zeros(s.shape[1], *shape) for s in sides]
                    cols = positions[w.start:w.stop]
                    mask[side][(cols,) if block is None else (cols, block)] = True
                    rows.append(b)
                    for m, keep in zip(masks, mask):
                        m.append(keep)
    device = ctx.batch.source_ids.device
    if not rows:
        extra = () if dims is None else (d,)
        return (torch.zeros(0, dtype=torch.long, device=device),
                tuple(torch.zeros(0, s.shape[1], *extra, dtype=torch.bool, device=device)
                      for s in sides))
    return torch.tensor(rows, device=device), tuple(torch.stack(m) for m in masks)


@attribution_method(family="perturbations", reduction="sum")
def occlusion(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    window: int = 1, stride: int = 1, hidden_window: int | None = None,
    hidden_stride: int | None = None, baseline: Fill = "auto", internal_batch_size: int = 32,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Occlusion (Zeiler & Fergus 2014, arXiv:1311.2901) of tokens, scored at every step.

    Each window of `window` consecutive ordinary tokens (every `stride`, per side and row) is
    replaced by the `baseline` embedding ("auto", the default, as in `integrated_gradients`;
    "unk", "pad" or "zeros"; `meta["baseline"]` names the one used); a token's score for step t
    is f_t(input) - f_t(occluded), averaged over the windows that cover it. A batch with
    feature groups (`prepare(groups=...)`) is occluded one source group at a time (one copy
    per group; `window`/`stride` then apply to the target side) and the result has one score
    per group (`fnattr.group_features`). Special tokens
    (BOS/EOS) are never occluded and score 0. One forward per window serves all steps;
    `internal_batch_size` windows run per forward. `progress=True` shows the occluded copies
    done on stderr.

    `hidden_window=h` (captum's `sliding_window_shapes=(window, h)`) occludes blocks of h
    embedding coordinates of `window` tokens, every `hidden_stride` (default h) coordinates; a
    coordinate's score is the mean drop of the blocks that cover it.

    Returns `source` [batch step src] and `target` [batch step tgt] (`extra_dims` ()), or
    [batch step src hidden] (`extra_dims` ("hidden",)) with `hidden_window`, and the step
    scores of the unoccluded input.

    >>> out = occlusion(model, batch, window=2)
    >>> out = occlusion(model, batch, hidden_window=64)  # 64 coordinates of a token at a time
    """
    if hidden_stride is not None and hidden_window is None:
        raise ValueError(f"`hidden_stride`={hidden_stride} without `hidden_window`: pass "
                         "hidden_window=N to slide over embedding dimensions too.")
    for name, value in (("window", window), ("stride", stride), ("hidden_window", hidden_window),
                        ("hidden_stride", hidden_stride),
                        ("internal_batch_size", internal_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}`={value}: it must be at least 1.")
    _grouped.check(batch, hidden_window=hidden_window)
    dims = None if hidden_window is None else (hidden_window, hidden_stride or hidden_window)
    if baseline not in ("auto", "unk", "pad", "zeros"):
        raise ValueError(f"`baseline`={baseline!r}: use 'auto', 'unk', 'pad' or 'zeros'.")
    args = call_args(occlusion, locals())
    with (report(progress, "occlusion", unit="perturbations") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        rows, masks = _occlusions(ctx, window, stride, dims)
        grouped = ctx.batch.source_groups is not None
        if grouped:  # one copy per source group instead of the source windows
            rows, masks, owner = _grouped.occlusions(ctx, occludable(ctx)[0], rows, masks)
        clean = _prefix.prefix(ctx, target_fn, masks)  # the clean forward, with its cache if it pays
        logits = clean_logits(ctx) if clean is None else clean.logits
        f_x = score_steps(target_fn, logits, ctx.batch, ctx.steps)
        drop = f_x[rows] - perturbed_scores(ctx, target_fn, rows, masks, baselines(ctx, baseline),
                                            internal_batch_size, bar=bar, clean=clean)
        scores = []
        for mask in masks:
            extra = (None,) * (mask.dim() - 2)
            total = f_x.new_zeros(len(ctx.batch), len(ctx.steps), *mask.shape[1:])
            total.index_add_(0, rows, drop[(..., None, *extra)] * mask[:, None])
            count = f_x.new_zeros(len(ctx.batch), *mask.shape[1:]).index_add_(0, rows, mask.to(f_x))
            scores.append(total / count.clamp(min=1)[:, None])
        out = finish(ctx, method="occlusion", args=args, target_fn=target_fn, source=scores[0],
                     target=scores[1] if ctx.attribute_target else None,
                     step_scores=logit_step_scores(ctx, logits, target_fn, step_scores),
                     extra_dims=() if dims is None else ("hidden",))
        if not grouped:
            return out
        return _grouped.result(ctx, out, _grouped.scatter(drop, rows, owner, len(ctx.batch),
                                                          _grouped.n_groups(ctx)))

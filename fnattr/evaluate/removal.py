"""Forwards of the removal copies of `fnattr.evaluate`.

A token is removed either by the neutral baseline embedding (`fnattr.baselines`, as occlusion
does: `perturbed_scores`) or by dropping it from the attention mask. The engine builds its
masks and position ids from the batch (`engine._forward`: `position_ids = cumsum(mask) - 1` on
decoder-only models), so a copy whose tokens are masked out is a `Batch` of its own with those
mask entries off: on a decoder-only model that is exactly the input with the tokens deleted.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr.batch import Batch
from fnattr.engine import forward, score_steps
from fnattr.attribution import Context
from fnattr.methods.occlusion import perturbed_scores
from fnattr.types import TargetFn


def masked_batch(
    batch: Batch, rows: Int[Tensor, " n"], drop_src: Bool[Tensor, "n src"],
    drop_tgt: Bool[Tensor, "n tgt"],
) -> Batch:
    """Copies of `batch`'s `rows` whose `drop_*` tokens are off in the attention mask."""
    idx = rows.tolist()

    def pick(texts: tuple) -> tuple:
        return tuple(texts[i] for i in idx)

    return dataclasses.replace(
        batch, source_ids=batch.source_ids[rows], source_special=batch.source_special[rows],
        source_mask=batch.source_mask[rows] & ~drop_src, target_ids=batch.target_ids[rows],
        target_mask=batch.target_mask[rows] & ~drop_tgt, target_special=batch.target_special[rows],
        source_tokens=pick(batch.source_tokens), target_tokens=pick(batch.target_tokens),
        sources=pick(batch.sources), targets=pick(batch.targets),
        source_template=None if batch.source_template is None else batch.source_template[rows],
        source_groups=None if batch.source_groups is None else batch.source_groups[rows],
        source_group_texts=None if batch.source_group_texts is None else pick(batch.source_group_texts))


def _contrast_at(ctx: Context, target_fn: TargetFn, rows: Tensor, source: Tensor, target: Tensor,
                 drop_src: Tensor, drop_tgt: Tensor) -> TargetFn:
    """`target_fn` with its contrast rerun on the masked copies, where the contrast shares a
    side with the attributed input (`fnattr.attribution.at_input` for masks)."""
    contrast = getattr(target_fn, "contrast", None)
    if contrast is None or contrast.shared is None or contrast.batch is None:
        return target_fn
    cb, own, shared = contrast.batch, contrast.embedded, contrast.shared
    none = {side: torch.zeros(len(rows), getattr(cb, f"{side}_ids").shape[1], dtype=torch.bool,
                              device=rows.device) for side in ("source", "target")}
    copy = masked_batch(cb, rows, drop_src if shared == "source" else none["source"],
                        drop_tgt if shared == "target" else none["target"])
    src = source if shared == "source" else own.source[rows]
    tgt = target if shared == "target" else own.target[rows]
    logits = forward(ctx.model, copy, ctx.handle, src, tgt, ctx.embedded.start)
    index = contrast.index[rows]
    aligned = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
    return target_fn.with_contrast(aligned, rows)


def _masked_scores(ctx: Context, target_fn: TargetFn, rows: Tensor, drop_src: Tensor,
                   drop_tgt: Tensor) -> Tensor:
    emb = ctx.embedded
    source, target = emb.source[rows], emb.target[rows]
    logits = forward(ctx.model, masked_batch(ctx.batch, rows, drop_src, drop_tgt), ctx.handle,
                     source, target, emb.start)
    fn = _contrast_at(ctx, target_fn, rows, source, target, drop_src, drop_tgt)
    # scored against the real batch: a masked-out target token is still a real step
    return score_steps(fn, logits, ctx.batch, ctx.steps, rows)


def copy_scores(
    ctx: Context, target_fn: TargetFn, rows: Int[Tensor, " n"], drop: Bool[Tensor, "n pos"],
    fills: tuple[Tensor, Tensor] | None, chunk: int,
) -> Float[Tensor, "n step"]:
    """Every step's score for copies of batch `rows` without their `drop` tokens (source columns
    then target columns): replaced by the `fills` embeddings, or masked out where `fills` is
    None. At most `chunk` copies per forward."""
    n_src = ctx.batch.source_ids.shape[1]
    drop_src, drop_tgt = drop[:, :n_src], drop[:, n_src:]
    if fills is not None:
        return perturbed_scores(ctx, target_fn, rows, (drop_src, drop_tgt), fills, chunk)
    out = [ctx.embedded.source.new_zeros(0, len(ctx.steps))]
    with torch.no_grad():
        for lo in range(0, len(rows), chunk):
            part = slice(lo, lo + chunk)
            out.append(_masked_scores(ctx, target_fn, rows[part], drop_src[part], drop_tgt[part]))
    return torch.cat(out)

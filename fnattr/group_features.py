"""Perturbation of whole feature groups (`prepare(groups=...)`, `fnattr.groups`).

Where a batch has groups, `occlusion` and `lime` perturb each source group as one feature: one
occluded copy per group (not per token), or one random keep/occlude bit per group. A group's
copy replaces every ordinary token of the group (special and template tokens keep their
embedding, as in token occlusion); a group with no ordinary token is never perturbed and scores
0. Target tokens stay token features. The copies run through the same `perturbed_scores` (and
its key/value prefix reuse) as token copies. The result's source axis is the groups
(`fnattr.groups.as_groups`), as `out.grouped()` of a token result would be.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr.attribution import Context
from fnattr.result import AttributionTensors


def check(batch, **unsupported) -> None:
    """Refuse options that perturb inside a token window when the batch has groups."""
    if batch.source_groups is None:
        return
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"`{name}`={value} with a grouped batch: groups are perturbed whole; "
                             "prepare the batch without `groups=` to slide over tokens.")


def features(ctx: Context, occludable: Bool[Tensor, "batch src"]) -> list[list[tuple[int, Tensor]]]:
    """Per row: (group index, its occludable source columns) of every group that has any."""
    batch = ctx.batch
    out = []
    for b, texts in enumerate(batch.source_group_texts):
        row = []
        for g in range(len(texts)):
            cols = ((batch.source_groups[b] == g) & occludable[b]).nonzero().squeeze(1)
            if len(cols):
                row.append((g, cols))
        out.append(row)
    return out


def occlusions(ctx: Context, occludable: Bool[Tensor, "batch src"], rows: Int[Tensor, " n"],
               masks: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """The group copies (one per group with an occludable token) followed by the target-side
    copies among the token windows `rows`/`masks`; and the group of each copy (-1: a target
    copy)."""
    src, tgt = masks
    target_copies = ~src.any(1)
    g_rows, g_src, owner = [], [], []
    for b, row in enumerate(features(ctx, occludable)):
        for g, cols in row:
            m = torch.zeros(src.shape[1], dtype=torch.bool, device=src.device)
            m[cols] = True
            g_rows.append(b)
            g_src.append(m)
            owner.append(g)
    dev = rows.device
    n = len(g_rows)
    new_rows = torch.cat([torch.tensor(g_rows, dtype=torch.long, device=dev), rows[target_copies]])
    new_src = torch.cat([torch.stack(g_src) if n else src[:0], src[target_copies]])
    new_tgt = torch.cat([tgt.new_zeros(n, tgt.shape[1]), tgt[target_copies]])
    owner = torch.cat([torch.tensor(owner, dtype=torch.long, device=dev),
                       torch.full((int(target_copies.sum()),), -1, dtype=torch.long, device=dev)])
    return new_rows, (new_src, new_tgt), owner


def n_groups(ctx: Context) -> int:
    return max([len(t) for t in ctx.batch.source_group_texts] + [1])


def scatter(values: Float[Tensor, "n step"], rows: Int[Tensor, " n"], owner: Int[Tensor, " n"],
            n_rows: int, width: int) -> Float[Tensor, "batch step group"]:
    """`values` of the group copies (owner >= 0) placed at [row, step, group]."""
    out = values.new_zeros(n_rows, values.shape[1], width)
    keep = owner >= 0
    out[rows[keep], :, owner[keep]] = values[keep]
    return out


def result(ctx: Context, out: AttributionTensors, scores: Float[Tensor, "batch step group"]
           ) -> AttributionTensors:
    """The token result `out` of `finish` with its source axis replaced by the group `scores`."""
    from fnattr.groups import as_groups

    step_mask = ctx.batch.target_mask[:, ctx.steps].cpu()
    scores = scores.detach().cpu() * step_mask[..., None].to(scores.dtype)
    return as_groups(out, scores, out.source_groups, out.group_texts,
                     out.meta.get("group_by", "spans"), "sum")


# ---- LIME ------------------------------------------------------------------------------------

def lime_features(ctx: Context, sides: tuple[Tensor, Tensor]):
    """LIME's features of a grouped batch: per row its groups (side 0, position = group index)
    then its occludable target tokens (side 1); padded to the longest row. Returns side, pos,
    real [rows feature], the count per row, and `member` [rows feature src]: the source columns
    a group feature occludes."""
    src_ok, tgt_ok = sides
    groups = features(ctx, src_ok)
    per_row = [[(0, g) for g, _ in row] + [(1, int(j)) for j in t.nonzero()]
               for row, t in zip(groups, tgt_ok)]
    n_feat = max(1, max(len(r) for r in per_row))
    n_src = ctx.batch.source_ids.shape[1]
    side = torch.zeros(len(per_row), n_feat, dtype=torch.long)
    pos = torch.zeros(len(per_row), n_feat, dtype=torch.long)
    real = torch.zeros(len(per_row), n_feat, dtype=torch.bool)
    member = torch.zeros(len(per_row), n_feat, n_src, dtype=torch.bool)
    for b, row in enumerate(per_row):
        for f, (s, p) in enumerate(row):
            side[b, f], pos[b, f], real[b, f] = s, p, True
        for f, (_, cols) in enumerate(groups[b]):
            member[b, f, cols.cpu()] = True
    return side, pos, real, [len(r) for r in per_row], member


def lime_source_masks(member: Bool[Tensor, "rows feature src"], keep: Bool[Tensor, "rows n feature"]
                      ) -> Bool[Tensor, "rows_n src"]:
    """Occluded source columns of every mask: those of the group features it leaves out."""
    dropped = (~keep).to(torch.float64) @ member.to(torch.float64)  # [rows n src]
    return (dropped > 0).flatten(0, 1)


def to_groups(coef: Float[Tensor, "rows step feature"], side: Tensor, pos: Tensor, real: Tensor,
              width: int) -> Float[Tensor, "rows step group"]:
    """Coefficients of the group features at [row, step, group]."""
    mine = ((side == 0) & real)[:, None, :].to(coef.device)
    scores = coef.new_zeros(*coef.shape[:2], width + 1)
    index = torch.where(mine, pos[:, None, :].to(coef.device), width).expand_as(coef)
    return scores.scatter_add_(2, index, coef * mine)[..., :width]

"""Faithfulness by feature groups (`prepare(groups=...)`): the ranking units are the source groups
(and, with target scores, the earlier target tokens), and removing a group removes every
ordinary token of it, as group occlusion does. Fractions are of the removable groups.

The plan is made on a batch of units (one column per group, real where the group has a
removable token) by `fnattr.evaluate`'s own `_plan`; its removal masks are then spread from
each group to its tokens."""

import dataclasses
import types

import torch
from torch import Tensor

from fnattr.result import AttributionTensors


def check(out: AttributionTensors, batch, removal: str) -> AttributionTensors:
    """`out` reduced to `batch`'s groups (as `out.grouped()`), checked against the batch."""
    if removal == "mask":
        raise ValueError("`removal`='mask' with a grouped batch is not supported (a group may hold "
                         "the token a step reads at its own position): use removal='auto'.")
    grouped = out if out.meta.get("grouped") else out.grouped()
    same = all(a.shape == b.shape and torch.equal(a, b.cpu()) for a, b in (
        (grouped.target_ids, batch.target_ids), (grouped.target_mask, batch.target_mask)))
    n = [len(t) for t in batch.source_group_texts]
    if not same or [int(m.sum()) for m in grouped.source_mask] != n:
        raise ValueError("`attributions` was computed for another batch or other groups: pass the "
                         "batch the method ran on.")
    return grouped


def members(batch) -> Tensor:
    """[batch group src]: the ordinary (removable) tokens of each group."""
    width = max([len(t) for t in batch.source_group_texts] + [1])
    g = batch.source_groups
    ok = (batch.source_mask & ~batch.source_special)[:, None, :]
    return (g[:, None, :] == torch.arange(width, device=g.device)[None, :, None]) & ok


def plan(ctx, grouped: AttributionTensors, plan_fn, **options) -> tuple[Tensor, Tensor]:
    """(removable units [b unit], removal masks over token positions [draw b unit L src+tgt])."""
    batch, member = ctx.batch, members(ctx.batch)
    width = member.shape[1]
    real = member.any(-1)
    units = dataclasses.replace(
        batch, source_ids=torch.zeros_like(real, dtype=batch.source_ids.dtype), source_mask=real,
        source_special=~real, source_tokens=tuple(("",) * width for _ in range(len(batch))),
        source_template=None, source_groups=None, source_group_texts=None, group_by=None)
    n, drop = plan_fn(types.SimpleNamespace(batch=units, steps=ctx.steps), grouped, **options)
    src = torch.einsum("dbulg,bgs->dbuls", drop[..., :width].to(torch.float64),
                       member.to(torch.float64)) > 0
    return n, torch.cat([src, drop[..., width:]], -1)

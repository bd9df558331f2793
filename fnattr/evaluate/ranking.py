"""Rankings and removal sets for `fnattr.evaluate`: which tokens a step can lose, in which order,
and how many at each level. Pure tensor functions; no model runs here.

Positions are the source columns followed by the target columns of the batch (`P = src + tgt`).
"""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr import aggregate

from fnattr.render import views
from fnattr.aggregate import Reducer
from fnattr.batch import Batch
from fnattr.result import AttributionTensors

SIGNS = ("signed", "positive", "abs")
RANKINGS = ("step", "example")


def token_scores(
    out: AttributionTensors, reduction: str | Reducer | None
) -> Float[Tensor, "batch step pos"]:
    """One score per position and step: the extra dims reduced as the views reduce them
    (`fnattr.views.default_reduction`) unless `reduction` says otherwise; zeros for the target
    columns of a result without target scores."""
    shown = aggregate.reduce(out, views.default_reduction(out) if reduction is None else reduction)
    target = shown.target
    if target is None:
        b, k = shown.source.shape[:2]
        target = shown.source.new_zeros(b, k, out.target_ids.shape[1])
    return torch.cat([shown.source, target.to(shown.source)], -1)


def candidates(
    batch: Batch, steps: Int[Tensor, " step"], *, target: bool, mask: bool
) -> Bool[Tensor, "batch step pos"]:
    """True where step k of row b can lose position i: a real, non-special token it reads (an
    earlier target token only when `target`); nothing for padding steps. With `mask` (removal
    through the attention mask) a decoder-only step keeps the token at its own query position,
    which it reads through its residual stream whatever the mask says."""
    n_src = batch.source_ids.shape[1]
    j = torch.arange(batch.target_ids.shape[1], device=steps.device)
    src = (batch.source_mask & ~batch.source_special)[:, None, :].expand(-1, len(steps), -1)
    tgt = ((batch.target_mask & ~batch.target_special)[:, None, :]
           & (j[None, :] < steps[:, None])[None] & target)
    can = torch.cat([src, tgt], -1) & batch.target_mask[:, steps][:, :, None]
    if mask and not batch.is_encoder_decoder:
        query = n_src - 1 + steps  # the last source token for step 0, else target token t - 1
        can = can.clone()
        can[:, torch.arange(len(steps), device=steps.device), query] = False
    return can


def example_candidates(
    can: Bool[Tensor, "batch step pos"], batch: Batch, steps: Int[Tensor, " step"], *, mask: bool
) -> Bool[Tensor, "batch pos"]:
    """Positions an example can lose under one ranking for all its steps: those some step can
    lose; with `mask` on a decoder-only model, minus every attributed step's query token."""
    out = can.any(1)
    if mask and not batch.is_encoder_decoder:
        out = out.clone()
        out[:, batch.source_ids.shape[1] - 1 + steps] = False
    return out


def keys(scores: Tensor, sign: str) -> Tensor:
    """The ranking key: the signed score, its positive part, or its magnitude."""
    return {"signed": scores, "positive": scores.clamp(min=0), "abs": scores.abs()}[sign]


def ranks(key: Tensor, can: Tensor) -> Tensor:
    """Rank of every position by decreasing `key` among `can` (0 = first removed); ties keep
    position order; positions outside `can` rank after all others."""
    key = key.masked_fill(~can, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def counts(fractions: Sequence[float | int], n: Tensor) -> Tensor:
    """Tokens to remove at each fraction of `n` removable tokens, `[*n.shape, level]`: the
    fraction rounded up, at least one token for a fraction above 0, none for 0."""
    out = []
    for q in fractions:
        if q == 0:
            out.append(torch.zeros_like(n))
        else:
            c = torch.ceil(n.double() * q - 1e-9).long()
            out.append(torch.minimum(c.clamp(min=1), n))
    return torch.stack(out, -1)


def count_of(q: float | int, n: int) -> int:
    """`counts` for one fraction and one number of tokens (for reading and for tests)."""
    return 0 if q == 0 or n == 0 else min(n, max(1, math.ceil(n * q - 1e-9)))


def removal_masks(
    rank: Int[Tensor, "*lead pos"], can: Bool[Tensor, "*lead pos"],
    remove: Int[Tensor, "*lead n_remove"], keep: Int[Tensor, "*lead n_keep"],
) -> Bool[Tensor, "*lead levels pos"]:
    """Removed positions at each level: first the `remove` counts (the top-c tokens go), then the
    `keep` counts (all but the top-c tokens go)."""
    top_r = rank[..., None, :] < remove[..., None]
    top_k = rank[..., None, :] < keep[..., None]
    return torch.cat([top_r, can[..., None, :] & ~top_k], -2)


def unique_copies(
    rows: Int[Tensor, " n"], masks: Bool[Tensor, "n pos"]
) -> tuple[Int[Tensor, " m"], Bool[Tensor, "m pos"], Int[Tensor, " n"]]:
    """The distinct (row, removal) pairs among `n` requests, and which one each request is, so
    an input that several steps, levels or metrics need runs once."""
    pad = (-masks.shape[1]) % 8
    bits = torch.nn.functional.pad(masks, (0, pad)).view(len(masks), -1, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=masks.device)
    packed = (bits << shifts).sum(-1, dtype=torch.long)  # 8 positions per number
    key = torch.cat([rows[:, None], packed], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(rows), device=rows.device), "amin")
    return rows[first], masks[first], inverse

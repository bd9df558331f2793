"""Perturbed copies of a decoder-only batch that share their clean prefix: the key/value cache of
the unperturbed input is computed once, and each copy runs only from its first changed position.

Replacing source token i leaves every position before i as it was (causal attention), so its
keys, values and logits are those of the clean forward. Copies are sorted by their first changed
position and run in chunks that start where the chunk's earliest change is; a chunk's logits
before that position are the clean ones. The work of a perturbation forward drops from L
positions to L - i (about half, on average, for occlusion).

Used where it is exact: decoder-only models whose cache is a plain, croppable `DynamicCache`
(no sliding window, no recurrent state), target functions that read only the logits (a
contrast rerun needs the whole forward), and forwards that take `past_key_values`,
`position_ids` and `logits_to_keep`. Elsewhere `prefix` is None and callers run whole forwards.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr.engine import _accepts, decoder_inputs, score_steps
from fnattr.attribution import Context, perturbed_inputs
from fnattr.progress import OFF, Reporter
from fnattr.types import TargetFn


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The clean forward of a batch: its inputs, the logits of every step, and its cache."""

    ids: Int[Tensor, "batch seq"]
    mask: Int[Tensor, "batch seq"]
    positions: Int[Tensor, "batch seq"]
    logits: Float[Tensor, "batch tgt vocab"]
    keys: tuple[Tensor, ...]  # per layer [batch heads seq head_dim]
    values: tuple[Tensor, ...]


# below this share of positions saved (copies that change early, e.g. LIME's random masks),
# whole forwards are run: the clean forward with its cache would cost more than it saves
MIN_SAVING = 0.1
# what one more forward call costs beyond its positions, in positions (a 1-row, 1-position
# forward of SmolLM2-135M took as long as ~30 positions of a large batch on a CPU)
CALL_COST = 32


def saving(masks: tuple[Tensor, Tensor]) -> float:
    """The share of input positions that copies changed by `masks` need not run."""
    starts = first_changed(masks)
    n_seq = masks[0].shape[1] + masks[1].shape[1] - 1
    return float(starts.sum()) / max(len(starts) * n_seq, 1)


def prefix(ctx: Context, target_fn: TargetFn, masks: tuple[Tensor, Tensor] | None = None
           ) -> Prefix | None:
    """The clean forward of `ctx.batch` with its key/value cache, where copies of the batch can
    run from their first changed position exactly (see the module docstring) and, given the
    copies' `masks`, where that saves at least `MIN_SAVING` of their positions; else None."""
    if masks is not None and (not len(masks[0]) or saving(masks) < MIN_SAVING):
        return None
    cache = new_cache(ctx, target_fn)
    if cache is None:
        return None
    batch, emb = ctx.batch, ctx.embedded
    ids, mask, positions = decoder_inputs(batch, torch.arange(len(batch), device=batch.source_ids.device))
    ctx.handle.replace(source=torch.cat([emb.source, emb.target[:, :-1]], 1))
    with torch.no_grad():
        out = ctx.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True,
                        logits_to_keep=batch.target_ids.shape[1])
    ctx.handle.check_used()
    layers = cache.layers
    if out.past_key_values is not cache or any(
            layer.keys is None or layer.keys.shape[-2] != ids.shape[1] for layer in layers):
        return None  # the model kept no full cache of its own input
    return Prefix(ids, mask, positions, out.logits, tuple(layer.keys for layer in layers),
                  tuple(layer.values for layer in layers))


def new_cache(ctx: Context, target_fn: TargetFn):
    """An empty `DynamicCache` for `ctx.model` where a forward can run in pieces on the cache
    of the earlier positions exactly (see the module docstring); else None."""
    from transformers import DynamicCache

    cls = type(ctx.model)
    if hasattr(ctx.model, "_orig_mod"):  # compiled: a cache's state and keyword sets retrace it
        return None
    if (ctx.batch.is_encoder_decoder or getattr(target_fn, "contrast", None) is not None
            or not all(_accepts(cls, name) for name in ("past_key_values", "position_ids",
                                                         "logits_to_keep"))):
        return None
    cache = DynamicCache(config=ctx.model.config)  # its layers follow the config
    if not cache.layers or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        return None  # a sliding window drops keys: a cropped cache would not be the prefix's
    return cache


def first_changed(masks: tuple[Bool[Tensor, "n src *d"], Bool[Tensor, "n tgt *d"]]) -> Int[Tensor, " n"]:
    """The first position of the model's input (source, then target tokens) that a copy
    changes (masks [n pos], or [n pos d] over embedding coordinates); the input's length where
    it changes none."""
    src, tgt = (m.flatten(2).any(-1) if m.dim() > 2 else m for m in masks)
    seq = torch.cat([src, tgt[:, :-1]], 1)
    idx = torch.arange(seq.shape[1], device=seq.device).expand_as(seq)
    return torch.where(seq, idx, seq.shape[1]).amin(1)


def chunks(starts: list[int], n_seq: int, size: int) -> list[slice]:
    """Consecutive runs of copies sorted by first changed position (`starts`), at most `size`
    each, that cost least: a run of n copies from start s costs n * (n_seq - s) positions plus
    `CALL_COST` (dynamic programming over the split points)."""
    n = len(starts)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - size), j):
            cost = best[i] + CALL_COST + (j - i) * (n_seq - starts[i])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(slice(cut[j], j))
        j = cut[j]
    return out[::-1]


def _run(ctx: Context, clean: Prefix, rows: Tensor, embeds: Tensor, start: int) -> Tensor:
    """Logits of every step `[n, tgt, vocab]` of copies of `rows` that read `embeds` from
    input position `start` on (their earlier positions are the clean batch's)."""
    from transformers import DynamicCache

    n_seq, n_tgt = clean.ids.shape[1], clean.logits.shape[1]
    logits = clean.logits[rows].clone()
    if start >= n_seq:
        return logits
    keep = min(n_seq - start, n_tgt)  # the steps whose logits read a changed position
    cache = DynamicCache([(k[rows, :, :start], v[rows, :, :start])
                          for k, v in zip(clean.keys, clean.values)], config=ctx.model.config)
    ctx.handle.replace(source=embeds[:, start:])
    out = ctx.model(input_ids=clean.ids[rows, start:], attention_mask=clean.mask[rows],
                    position_ids=clean.positions[rows, start:], past_key_values=cache,
                    use_cache=True, logits_to_keep=keep)
    ctx.handle.check_used()
    logits[:, n_tgt - keep:] = out.logits.to(logits.dtype)
    return logits


def perturbed_scores(
    ctx: Context, clean: Prefix, target_fn: TargetFn, rows: Int[Tensor, " n"],
    masks: tuple[Bool[Tensor, "n src *d"], Bool[Tensor, "n tgt *d"]],
    fills: tuple[Tensor, Tensor], chunk: int, *, bar: Reporter = OFF,
) -> Float[Tensor, "n step"]:
    """`occlusion.perturbed_scores` from the clean prefix `clean` (`prefix(ctx, target_fn)`):
    copies sorted by first changed position, at most `chunk` per forward (`chunks`), results in
    the given order."""
    emb = ctx.embedded
    starts = first_changed(masks)
    order = torch.argsort(starts, stable=True)
    out = emb.source.new_zeros(len(rows), len(ctx.steps))
    bar.expect(len(rows))
    with torch.no_grad():
        for part in chunks(starts[order].tolist(), clean.ids.shape[1], chunk):
            pick = order[part]
            r = rows[pick]
            src, tgt = perturbed_inputs(ctx, masks, fills, pick, r)
            logits = _run(ctx, clean, r, torch.cat([src, tgt[:, :-1]], 1), int(starts[pick].min()))
            out[pick] = score_steps(target_fn, logits, ctx.batch, ctx.steps, r)
            bar.advance(len(r))
    return out

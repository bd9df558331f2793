"""Attention weights as attribution: the rows of the attention matrices that predict each step."""

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from fnattr.batch import Batch
from fnattr.hooks.attention import capture_attention
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, clean_logits, finish, logit_step_scores,
)
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

SourceAttention = Literal["cross", "encoder"]


def _stack(layers: list[Tensor], kind: str) -> Float[Tensor, "rows layer head query key"]:
    if not layers:
        raise RuntimeError(f"the forward recorded no {kind} attention weights.")
    return torch.stack(layers, 1)


def _pick(values: Sequence[int] | None, n: int, name: str) -> Tensor | None:
    if values is None:
        return None
    values = list(values)
    if not values:
        raise ValueError(f"`{name}` is empty: pass indices in -{n}..{n - 1}, or None for all.")
    for v in values:
        if not -n <= v < n:
            raise ValueError(f"`{name}` has {v}, outside the model's {n} {name}: use -{n}..{n - 1}.")
    return torch.tensor([v % n for v in values])


def _rows(att: Tensor, queries: Tensor, lo: int, hi: int) -> Float[Tensor, "rows step key layer head"]:
    """Attention rows at `queries` over keys [lo, hi), as [rows, step, key, layer, head]."""
    return att[:, :, :, queries.to(att.device), lo:hi].permute(0, 3, 4, 1, 2)


def _pad_last_key(rows: Tensor) -> Tensor:
    """Append a zero key column: the last target token is never an input (it is only predicted)."""
    return torch.cat([rows, rows.new_zeros(*rows.shape[:2], 1, *rows.shape[3:])], 2)


def _weights(ctx: Context, cap, source_attention: str) -> tuple[Tensor, Tensor | None, tuple]:
    """Source and target scores [batch step pos *extra] of the captured forward, and extra dims."""
    batch, steps = ctx.batch, ctx.steps
    n_src = batch.source_ids.shape[1]
    if not batch.is_encoder_decoder:
        att = _stack(cap.weights["self"], "self")  # queries/keys: source, then target[:-1]
        src = _rows(att, n_src - 1 + steps, 0, n_src)
        tgt = _pad_last_key(_rows(att, n_src - 1 + steps, n_src, att.shape[-1]))
        return src, tgt if ctx.attribute_target else None, ("layer", "head")
    tgt = None
    if ctx.attribute_target:  # decoder keys: start token, then target[:-1]
        att = _stack(cap.weights["self"], "self")
        tgt = _pad_last_key(_rows(att, steps, 1, att.shape[-1]))
    if source_attention == "cross":
        return _rows(_stack(cap.weights["cross"], "cross"), steps, 0, n_src), tgt, ("layer", "head")
    enc = _stack(cap.weights["encoder"], "encoder")  # [rows layer head query key]
    enc = enc * batch.source_mask[:, None, None, :, None]
    src = enc.permute(0, 4, 1, 2, 3)[:, None].expand(-1, len(steps), -1, -1, -1, -1)
    return src, tgt, ("layer", "head", "query")


def _select(t: Tensor | None, dims: tuple, layers: Tensor | None, heads: Tensor | None,
            average: tuple) -> Tensor | None:
    if t is None:
        return None
    for name, idx in (("layer", layers), ("head", heads)):
        if idx is not None:
            t = t.index_select(3 + dims.index(name), idx.to(t.device))
    for name in reversed(dims):
        if name in average:
            t = t.mean(3 + dims.index(name))
    return t


@attribution_method(family="internals", reduction="mean")
def attention(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
    average: Sequence[str] = (), source_attention: SourceAttention = "cross",
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Attention weights (Bahdanau et al. 2015, arXiv:1409.0473) of one teacher-forced forward.

    Decoder-only: the self-attention row of the query that predicts step t, over the source and
    earlier target tokens. Encoder-decoder: the cross-attention row of decoder position t over
    the source; with `attribute_target=True` also the decoder self-attention row over earlier
    target tokens (the decoder start token's weight is left out, so these rows sum to 1 with it).
    `source_attention="encoder"` puts the encoder self-attention in `source` instead, with a
    trailing "query" dim (`source[b, k, i, l, h, q]`: weight of key i for encoder query q, the
    same for every step). `layers` / `heads` select indices; `average` names extra dims
    ("layer", "head", "query") to average away. The model runs with eager attention inside the
    call only; its own attention implementation is restored afterwards. `progress=True`
    reports the forward on stderr.

    Returns `source` [batch step src layer head] and `target` [batch step tgt layer head],
    `extra_dims` ("layer", "head") minus the averaged ones; `step_scores` of the same forward.

    >>> out = attention(model, batch, average=("layer", "head"))   # one weight per token
    """
    if source_attention not in ("cross", "encoder"):
        raise ValueError(f"`source_attention`={source_attention!r}: use 'cross' or 'encoder'.")
    if source_attention == "encoder" and not batch.is_encoder_decoder:
        raise ValueError("`source_attention='encoder'` needs an encoder-decoder model; "
                         "decoder-only models have only self-attention: leave it at 'cross'.")
    if source_attention == "encoder" and attribute_target:
        raise ValueError("`source_attention='encoder'` adds a 'query' dim that the target side does "
                         "not have: run with attribute_target=False, then once more for the target.")
    average = tuple(average)
    args = call_args(attention, locals())
    with (report(progress, "attention", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        bar.expect(len(ctx.batch))
        kinds = ["self"] if not batch.is_encoder_decoder else (
            [source_attention] + (["self"] if ctx.attribute_target else []))
        with torch.no_grad(), capture_attention(model, kinds) as cap:
            logits = clean_logits(ctx)
        bar.advance(len(ctx.batch))
        src, tgt, dims = _weights(ctx, cap, source_attention)
        for name in average:
            if name not in dims:
                raise ValueError(f"`average` names {name!r}: use some of {list(dims)}.")
        n_layers, n_heads = src.shape[3], src.shape[4]
        idx = _pick(layers, n_layers, "layers"), _pick(heads, n_heads, "heads")
        src, tgt = (_select(t, dims, *idx, average) for t in (src, tgt))
        return finish(ctx, method="attention", args=args, target_fn=target_fn, source=src,
                      target=tgt, step_scores=logit_step_scores(ctx, logits, target_fn, step_scores),
                      extra_dims=tuple(d for d in dims if d not in average))

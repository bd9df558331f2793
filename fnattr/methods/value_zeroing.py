"""Value zeroing (Mohebbi et al. 2023, arXiv:2301.12971) for every step, per layer.

Zeroing token j's value vector in layer l's attention leaves layers below l untouched, so layer l
is replayed alone on its captured clean inputs: one replay row per zeroed token serves every step
(the hidden state of the position predicting step t only reads tokens before it), and the rows of
many zeroed tokens run in one call.
"""

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from fnattr.batch import Batch
from fnattr.engine import forward
from fnattr.hooks.value_zeroing import (
    HeadSpec, LayerCall, ValueZeroingHandle, capture_layers, layer_stacks, resolve_heads,
)
from fnattr.hooks.value_zeroing import value_zeroing as zeroed_values
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, clean_logits, finish, logit_step_scores,
)
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import OFF, Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

Similarity = Literal["cosine", "euclidean"]
Output = Literal["decoder", "encoder_self", "encoder_to_decoder", "encoder"]
OUTPUTS = ("decoder", "encoder_self", "encoder_to_decoder")


def distance(a: Float[Tensor, "*n d"], b: Float[Tensor, "*n d"], similarity: Similarity) -> Tensor:
    """Cosine distance `1 - cos(a, b)` or euclidean distance `|a - b|` over the last dim, computed
    in float64 (1 - cos cancels: float32 would floor small distances at ~1e-7)."""
    a64, b64 = a.double(), b.double()
    if similarity == "cosine":
        out = 1 - F.cosine_similarity(a64, b64, dim=-1)
    else:
        out = (a64 - b64).norm(dim=-1)
    return out.to(a.dtype)


# layer inputs whose first dim is batch x heads, batch-major (Bloom's alibi)
_BATCH_TIMES_HEADS = ("alibi",)


def _take(x, rows: Tensor, n: int):
    """Rows `rows` of every batch-shaped tensor in a layer's inputs; others (masks of batch 1) as is."""
    if isinstance(x, Tensor):
        return x[rows] if x.ndim >= 2 and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, rows, n) for v in x)
    return x


def replay(layer: nn.Module, call: LayerCall, rows: Tensor, n: int) -> Tensor:
    """Run `layer` again on the inputs of its captured call, for batch rows `rows`."""
    kwargs = {k: _take(v, rows, n) if k not in _BATCH_TIMES_HEADS or not isinstance(v, Tensor)
              else v.unflatten(0, (n, -1))[rows].flatten(0, 1) for k, v in call.kwargs.items()}
    out = layer(*_take(call.args, rows, n), **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def zeroing_scores(
    layers: nn.ModuleList, calls: dict[int, LayerCall], vz: ValueZeroingHandle,
    zero: Bool[Tensor, "batch seq"], queries: Tensor, similarity: Similarity, chunk: int,
    *, bar: Reporter = OFF,
) -> Float[Tensor, "batch layer seq query"]:
    """Distance of each query position's layer-l state when token j's value is zeroed in layer l
    (each layer counted on `bar`)."""
    n, seq = zero.shape
    ref = calls[0].output
    out = ref.new_zeros(n, len(layers), seq, len(queries))
    pairs = zero.nonzero()
    bar.expect(len(layers))
    for layer, module in enumerate(layers):
        if vz.heads.get(layer, ()) == ():
            bar.advance()
            continue
        clean = calls[layer].output[:, queries]
        for lo in range(0, len(pairs), chunk):
            b, j = pairs[lo:lo + chunk].unbind(1)
            vz.zero(F.one_hot(j, seq).bool())
            before = vz.calls[layer]
            new = replay(module, calls[layer], b, n)[:, queries]
            if vz.calls[layer] == before:
                raise RuntimeError(f"value_zeroing saw no {vz.attention} attention call in layer "
                                   f"{layer} of {type(module).__name__}: its attention does not use "
                                   "transformers' attention interface.")
            out[b, layer, j] = distance(new, clean[b], similarity)
        bar.advance()
    vz.zero(None)
    return out


def _self_scores(ctx, kind, heads, zero, queries, similarity, chunk, bar: Reporter):
    """Clean forward capturing the stack's layers, then replay each layer with tokens zeroed."""
    layers = layer_stacks(ctx.model)["encoder" if kind == "encoder" else "decoder"]
    with capture_layers(layers) as calls:
        logits = clean_logits(ctx)
    bar.update(detail=f"{kind} attention")
    with zeroed_values(ctx.model, None, heads, attention=kind) as vz:
        return logits, zeroing_scores(layers, calls, vz, zero, queries, similarity, chunk, bar=bar)


def _encoder_to_decoder(ctx, heads, similarity, chunk, bar: Reporter) -> Float[Tensor, "batch layer src step"]:
    """Zero source token i in encoder layer l; distance of the decoder's last-layer state at each step."""
    stacks = layer_stacks(ctx.model)
    last, emb, batch = stacks["decoder"][-1:], ctx.embedded, ctx.batch
    with capture_layers(last) as calls:
        forward(ctx.model, batch, ctx.handle, emb.source, emb.target, emb.start)
    clean = calls[0].output[:, ctx.steps]
    n, src = batch.source_ids.shape
    out = clean.new_zeros(n, len(stacks["encoder"]), src, len(ctx.steps))
    pairs = batch.source_mask.nonzero()
    bar.update(detail="encoder attention")
    bar.expect(len(stacks["encoder"]))
    for layer in range(len(stacks["encoder"])):
        with zeroed_values(ctx.model, [layer], heads, attention="encoder") as vz:
            if vz.heads.get(layer, ()) == ():
                bar.advance()
                continue
            for lo in range(0, len(pairs), chunk):
                b, i = pairs[lo:lo + chunk].unbind(1)
                vz.zero(F.one_hot(i, src).bool())
                with capture_layers(last) as calls:
                    forward(ctx.model, batch, ctx.handle, emb.source[b], emb.target[b], emb.start, b)
                out[b, layer, i] = distance(calls[0].output[:, ctx.steps], clean[b], similarity)
        bar.advance()
    return out


def _pad_last(x: Tensor) -> Tensor:
    """[batch layer tgt-1 step] -> [batch layer tgt step]: the last target token is no input."""
    return F.pad(x, (0, 0, 0, 1))


def _decoder_only(ctx: Context, heads, similarity, chunk, bar: Reporter):
    batch, steps = ctx.batch, ctx.steps
    n_src = batch.source_ids.shape[1]
    mask = torch.cat([batch.source_mask, batch.target_mask[:, :-1]], 1)
    visible = torch.arange(mask.shape[1], device=mask.device) <= n_src - 1 + int(steps.max())
    if not ctx.attribute_target:
        visible &= torch.arange(mask.shape[1], device=mask.device) < n_src
    logits, d = _self_scores(ctx, "decoder", heads, mask & visible, n_src - 1 + steps, similarity, chunk,
                             bar)
    target = _pad_last(d[:, :, n_src:]) if ctx.attribute_target else None
    return logits, d[:, :, :n_src], target


def _encoder_decoder(ctx: Context, heads_by_kind, output, similarity, chunk, bar: Reporter):
    batch, steps = ctx.batch, ctx.steps
    if output == "encoder_to_decoder":
        emb = ctx.embedded
        logits = forward(ctx.model, batch, ctx.handle, emb.source, emb.target, emb.start)
        return logits, _encoder_to_decoder(ctx, heads_by_kind["encoder"], similarity, chunk, bar), None
    if output == "encoder_self":
        queries = torch.arange(batch.source_ids.shape[1], device=steps.device)
        logits, d = _self_scores(ctx, "encoder", heads_by_kind["encoder"], batch.source_mask, queries,
                                 similarity, chunk, bar)  # [batch layer key query]
        d = d * batch.source_mask[:, None, None, :]  # padding queries score 0
        return logits, d.permute(0, 2, 1, 3)[:, None].expand(-1, len(steps), -1, -1, -1), None
    logits, source = _self_scores(ctx, "cross", heads_by_kind["cross"], batch.source_mask, steps,
                                  similarity, chunk, bar)
    target = None
    if ctx.attribute_target:
        pos = torch.arange(batch.target_ids.shape[1], device=steps.device)
        zero = torch.cat([torch.zeros_like(batch.target_mask[:, :1]), batch.target_mask[:, :-1]], 1)
        _, d = _self_scores(ctx, "decoder", heads_by_kind["decoder"], zero & (pos <= int(steps.max())),
                            steps, similarity, chunk, bar)
        target = _pad_last(d[:, :, 1:])
    return logits, source, target


@attribution_method(family="internals", reduction="mean")
def value_zeroing(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    similarity: Similarity = "cosine", output: Output = "decoder",
    decoder_heads: HeadSpec = None, encoder_heads: HeadSpec = None, cross_heads: HeadSpec = None,
    internal_batch_size: int = 256, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Value zeroing (Mohebbi et al. 2023, arXiv:2301.12971): the distance (`similarity`: cosine
    or euclidean) between the clean layer-l hidden state of the position predicting each step and
    the same state when token j's value vector is zeroed in layer l's attention.

    Decoder-only models and `output="decoder"` of encoder-decoder models score the decoder's
    layers: source tokens through self-attention (decoder-only) or cross-attention, earlier target
    tokens through self-attention. Two outputs score the encoder (source tokens only):
    `output="encoder_self"` is the encoder's own value zeroing (inseq's
    `output_encoder_self_scores`): source token i zeroed in encoder layer l, measured at encoder
    layer l's state of each source position q, the same for every step. `"encoder_to_decoder"`
    zeroes source token i in encoder layer l and measures the decoder's last-layer state at each
    step. (`"encoder"`, which named the latter, is deprecated: it warns and runs
    "encoder_to_decoder".) `*_heads` choose the zeroed value heads
    per attention kind: an int, a range, a list, or a dict {layer: heads} (omitted layers score 0);
    None zeroes all heads. `internal_batch_size` bounds the zeroed copies run in one call.
    `progress=True` shows the layers done on stderr.

    Returns `source` [batch step src layer] and `target` [batch step tgt layer] (`extra_dims`
    ("layer",)); with `output="encoder_self"`, `source` [batch step src layer query] (`extra_dims`
    ("layer", "query"); `source[b, k, i, l, q]`: zeroing key i, measured at query q). The target
    function only gives the step scores.

    >>> out = value_zeroing(model, prepare(model, tok, "The capital of France is"))
    >>> out.source[0, 0, :, -1]   # last layer, first step
    """
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"`similarity`={similarity!r}: use 'cosine' or 'euclidean'.")
    if output not in (*OUTPUTS, "encoder"):
        raise ValueError(f"`output`={output!r}: use one of {list(OUTPUTS)}.")
    if output != "decoder" and not model.config.is_encoder_decoder:
        raise ValueError(f"`output`={output!r} needs an encoder-decoder model: use 'decoder'.")
    if output != "decoder" and attribute_target:
        raise ValueError(f"`output`={output!r} scores source tokens only: pass attribute_target=False.")
    if output == "encoder":
        warnings.warn("value_zeroing(output='encoder') is deprecated: it is 'encoder_to_decoder' (the "
                      "decoder's last-layer state); 'encoder_self' gives the encoder's own scores.",
                      FutureWarning, stacklevel=2)
        output = "encoder_to_decoder"
    if internal_batch_size < 1:
        raise ValueError(f"`internal_batch_size`={internal_batch_size}: it must be at least 1.")
    args = call_args(value_zeroing, locals())
    heads = {"decoder": decoder_heads, "encoder": encoder_heads, "cross": cross_heads}
    stacks = layer_stacks(model)
    for kind, spec in heads.items():  # validate layer numbers before touching the model
        stack = stacks.get("encoder" if kind == "encoder" else "decoder")
        if stack is not None:
            resolve_heads(spec, len(stack), f"{kind}_heads")
    with (report(progress, "value_zeroing", unit="layers") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                logits, src, tgt = _encoder_decoder(ctx, heads, output, similarity,
                                                    internal_batch_size, bar)
            else:
                logits, src, tgt = _decoder_only(ctx, decoder_heads, similarity, internal_batch_size,
                                                 bar)
        perm = lambda x: None if x is None else x.permute(0, 3, 2, 1)  # noqa: E731
        dims = ("layer", "query") if output == "encoder_self" else ("layer",)
        return finish(ctx, method="value_zeroing", args=args, target_fn=target_fn,
                      source=src if output == "encoder_self" else perm(src), target=perm(tgt),
                      step_scores=logit_step_scores(ctx, logits, target_fn, step_scores),
                      extra_dims=dims)

"""`value_zeroing`: zero chosen tokens' value vectors inside a model's attention, restored on exit.

Architecture-agnostic: transformers attention modules fetch their kernel (eager, sdpa, flash, ...)
through `ALL_ATTENTION_FUNCTIONS.get_interface(...)` and call it as `fn(module, query, key, value,
mask, ...)`. While the context is open, that lookup returns the same kernel wrapped so that, for the
chosen layers' attention modules only, the value tensor `[rows, heads, seq, head_dim]` has the
chosen tokens and heads set to 0 before the kernel runs. No per-model table of module names.
The lookup is replaced process-wide while the context is open (other models' attention passes
through unchanged); nested contexts must exit in LIFO order, so do not share one across threads.
"""

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from jaxtyping import Bool
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from fnattr.types import Model

Attention = Literal["decoder", "encoder", "cross"]
Heads = int | range | Sequence[int]
HeadSpec = Heads | Mapping[int, Heads] | None
ATTENTIONS = ("decoder", "encoder", "cross")


def _layer_list(stack: nn.Module, what: str) -> nn.ModuleList:
    """The stack's transformer layers: its shallowest (then longest) `nn.ModuleList`."""
    lists = [(name.count("."), -len(m), name, m) for name, m in stack.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"found no list of layers (nn.ModuleList) in the {what} of "
                         f"{type(stack).__name__}: value zeroing needs a stack of transformer layers.")
    return min(lists, key=lambda t: t[:3])[3]


def layer_stacks(model: Model) -> dict[str, nn.ModuleList]:
    """The layers of each stack: {"decoder": ...} or {"encoder": ..., "decoder": ...}."""
    if model.config.is_encoder_decoder:
        return {"encoder": _layer_list(model.get_encoder(), "encoder"),
                "decoder": _layer_list(model.get_decoder(), "decoder")}
    return {"decoder": _layer_list(model.get_decoder(), "decoder")}


def _indices(spec: Heads, name: str) -> tuple[int, ...]:
    if isinstance(spec, int):
        spec = [spec]
    out = tuple(spec)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in out):
        raise ValueError(f"`{name}`={spec!r}: give head indices as an int, a range or a list of "
                         "non-negative ints.")
    return out


def resolve_heads(spec: HeadSpec, n_layers: int, name: str = "heads") -> dict[int, tuple[int, ...] | None]:
    """Per-layer heads to zero: None = all heads. A dict names each layer; layers it omits zero none."""
    if isinstance(spec, Mapping):
        bad = [k for k in spec if not isinstance(k, int) or not -n_layers <= k < n_layers]
        if bad:
            raise ValueError(f"`{name}` names layers {bad}; the stack has {n_layers} (0..{n_layers - 1}).")
        per = {k % n_layers: _indices(v, f"{name}[{k}]") for k, v in spec.items()}
        return {layer: per.get(layer, ()) for layer in range(n_layers)}
    heads = None if spec is None else _indices(spec, name)
    return dict.fromkeys(range(n_layers), heads)


@dataclasses.dataclass
class ValueZeroingHandle:
    """Says which tokens to zero (`zero`); counts the zeroing calls per layer (`calls`)."""

    attention: str
    heads: dict[int, tuple[int, ...] | None]
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _tokens: Tensor | None = None

    def zero(self, tokens: Bool[Tensor, "rows seq"] | None) -> None:
        """Zero the value vectors of `tokens` (True) in the next forwards; None zeroes nothing.

        `seq` is the length of the zeroed attention's keys: the decoder (or whole) sequence for
        self-attention, the encoder sequence for "encoder" and "cross". One row broadcasts.
        """
        self._tokens = tokens

    def _apply(self, layer: int, value: Tensor) -> Tensor:
        heads = self.heads.get(layer, ())
        if self._tokens is None or heads == ():
            return value
        self.calls[layer] += 1
        rows, n_heads, seq = value.shape[:3]
        tokens = self._tokens.to(value.device)
        if tokens.shape[1] != seq or tokens.shape[0] not in (1, rows):
            raise ValueError(f"zero(tokens) has shape {tuple(tokens.shape)} but layer {layer}'s "
                             f"{self.attention} attention has {rows} rows of {seq} tokens.")
        if heads is None:
            return value.masked_fill(tokens[:, None, :, None], 0)
        if max(heads) >= n_heads:
            raise ValueError(f"heads {list(heads)} for layer {layer}: its {self.attention} attention has "
                             f"{n_heads} value heads (key-value heads under grouped-query attention).")
        head_mask = tokens.new_zeros(n_heads)
        head_mask[list(heads)] = True
        return value.masked_fill(tokens[:, None, :, None] & head_mask[None, :, None, None], 0)


def _owners(stacks: Mapping[str, nn.ModuleList]) -> dict[int, tuple[str, int]]:
    return {id(m): (side, layer) for side, layers in stacks.items()
            for layer, block in enumerate(layers) for m in block.modules()}


@contextmanager
def value_zeroing(
    model: Model, layers: int | Sequence[int] | None = None, heads: HeadSpec = None, *,
    attention: Attention = "decoder",
) -> Iterator[ValueZeroingHandle]:
    """Zero the value vectors of chosen tokens in the attention of `layers` (None: all).

    `attention`: "decoder" (self-attention of a decoder-only model or of the decoder), "encoder"
    (encoder self-attention) or "cross" (the decoder's cross-attention over the encoder). `heads`
    indexes the value tensor's heads (key-value heads under grouped-query attention): an int, a
    range, a list, or a dict {layer: heads} (layers it omits zero nothing); None zeroes all heads.
    The model runs unchanged until `handle.zero(tokens)` names tokens; the hook is gone on exit.

    >>> with value_zeroing(model, layers=[0], heads=None) as vz:
    ...     vz.zero(torch.tensor([[False, True, False]]))   # token 1's value is 0 in layer 0
    ...     out = model(input_ids=ids)
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"`attention`={attention!r}: use one of {ATTENTIONS}.")
    stacks = layer_stacks(model)
    side = "encoder" if attention == "encoder" else "decoder"
    if attention != "decoder" and not model.config.is_encoder_decoder:
        raise ValueError(f"`attention`={attention!r} needs an encoder-decoder model; "
                         f"{type(model).__name__} is decoder-only: use 'decoder'.")
    n = len(stacks[side])
    wanted = range(n) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in wanted if not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise ValueError(f"`layers` names {bad}; the {side} has {n} layers (0..{n - 1}).")
    chosen = {i % n for i in wanted}
    per_layer = resolve_heads(heads, n)
    handle = ValueZeroingHandle(attention, {k: v for k, v in per_layer.items() if k in chosen})
    owners = _owners(stacks)
    # self- then cross-attention run inside each decoder layer of an encoder-decoder model
    seen: dict[int, int] = {}
    cross_model = bool(model.config.is_encoder_decoder)

    def reset(module: nn.Module, args: Any) -> None:
        seen[id(module)] = 0

    def wrap(kernel: Callable) -> Callable:
        def zeroing_kernel(module, query, key, value, *args, **kwargs):
            where = owners.get(id(module))
            if where is not None:
                stack, layer = where
                block = id(stacks[stack][layer])
                kind = stack
                if stack == "decoder" and cross_model:
                    kind = "decoder" if seen.get(block, 0) == 0 else "cross"
                    seen[block] = seen.get(block, 0) + 1
                if kind == attention:
                    value = handle._apply(layer, value)
            return kernel(module, query, key, value, *args, **kwargs)
        return zeroing_kernel

    previous = ALL_ATTENTION_FUNCTIONS.__dict__.get("get_interface")
    lookup = ALL_ATTENTION_FUNCTIONS.get_interface
    hooks = []
    try:
        for block in stacks["decoder"]:
            hooks.append(block.register_forward_pre_hook(reset))
        ALL_ATTENTION_FUNCTIONS.get_interface = lambda impl, default: wrap(lookup(impl, default))
        yield handle
    finally:
        if previous is None:
            ALL_ATTENTION_FUNCTIONS.__dict__.pop("get_interface", None)
        else:
            ALL_ATTENTION_FUNCTIONS.get_interface = previous
        for h in reversed(hooks):
            h.remove()


@dataclasses.dataclass
class LayerCall:
    """One captured call of a layer: its inputs and its output hidden states."""

    args: tuple
    kwargs: dict
    output: Tensor | None = None


@contextmanager
def capture_layers(layers: Iterable[nn.Module]) -> Iterator[dict[int, LayerCall]]:
    """Record the inputs and output hidden states of each of `layers`' last call; hooks removed on exit."""
    calls: dict[int, LayerCall] = {}
    hooks = []

    def before(i):
        def hook(module, args, kwargs):
            calls[i] = LayerCall(args, kwargs)
        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            calls[i].output = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(after(i), with_kwargs=True))
        yield calls
    finally:
        for h in reversed(hooks):
            h.remove()

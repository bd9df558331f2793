"""`value_zeroing`: zero chosen tokens' value vectors inside a model's attention, restored on exit.

Architecture-agnostic: transformers attention modules fetch their kernel (eager, sdpa, flash, ...)
through `ALL_ATTENTION_FUNCTIONS.get_interface(...)` and call it as `fn(module, query, key, value,
mask, ...)`. While the context is open, that lookup returns the same kernel wrapped so that, for the
chosen layers' attention modules only, the value tensor `[rows, heads, seq, head_dim]` has the
chosen tokens and heads set to 0 before the kernel runs. No per-model table of module names.
The lookup is replaced process-wide while the context is open (other models' attention passes
through unchanged); nested contexts must exit in LIFO order, so do not share one across threads.

Models whose attention does not go through that interface (GPT-J, Bloom, Falcon: no
`_can_record_outputs`) are zeroed at the projection that produces the values instead: a forward
hook on `v_proj`, or on the fused `query_key_value` (Bloom and Falcon layouts), sets the chosen
tokens' and heads' value slices to 0 (`_value_layout`).
"""

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from transformers import PreTrainedModel
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


def uses_attention_interface(model: Model) -> bool:
    """Whether the model declares its attention outputs (`_can_record_outputs`, transformers 5),
    which marks attention that runs through `ALL_ATTENTION_FUNCTIONS`."""
    return any(getattr(m, "_can_record_outputs", None) for m in model.modules()
               if isinstance(m, PreTrainedModel))


def layer_attention(model: Model) -> dict[str, list[list[nn.Module]]]:
    """The attention modules of every layer, by stack: each layer's shallowest modules whose class
    name ends in "Attention", in registration order (self-attention, then cross-attention)."""
    out: dict[str, list[list[nn.Module]]] = {}
    for side, layers in layer_stacks(model).items():
        out[side] = []
        for block in layers:
            found = [(name.count("."), m) for name, m in block.named_modules()
                     if name and type(m).__name__.lower().endswith("attention")]
            depth = min((d for d, _ in found), default=None)
            out[side].append([m for d, m in found if d == depth])
    return out


def _value_layout(attn: nn.Module) -> tuple[nn.Linear, int, int]:
    """(projection, value heads G, head_dim) of an attention module outside the interface: the
    projection's output `[rows, seq, G * P * head_dim]` viewed `[rows, seq, G, P, head_dim]` holds
    value head g at `[..., g, P - 1, :]` (`v_proj`: P = 1; Bloom and Falcon's fused
    `query_key_value`: the value slot comes last in each head or key-value group)."""
    head_dim = getattr(attn, "head_dim", None)
    v_proj, fused = getattr(attn, "v_proj", None), getattr(attn, "query_key_value", None)
    if isinstance(head_dim, int) and isinstance(v_proj, nn.Linear):
        return v_proj, v_proj.out_features // head_dim, head_dim
    if isinstance(head_dim, int) and isinstance(fused, nn.Linear):
        if getattr(attn, "new_decoder_architecture", False):
            groups = attn.num_kv_heads
        else:
            groups = 1 if getattr(attn, "multi_query", False) else attn.num_heads
        if fused.out_features % (groups * head_dim) == 0:
            return fused, groups, head_dim
    raise ValueError(f"{type(attn).__name__} does not use transformers' attention interface and has no "
                     "value projection that value zeroing knows (`v_proj`, or a Bloom/Falcon-style "
                     "`query_key_value`): this model cannot be value-zeroed.")


def _projection_hook(handle: "ValueZeroingHandle", layer: int, groups: int, head_dim: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        rows, seq, width = output.shape
        parts = output.view(rows, seq, groups, width // (groups * head_dim), head_dim)
        value = parts[..., -1, :].transpose(1, 2)  # [rows, groups, seq, head_dim], as the kernels see it
        zeroed = handle._apply(layer, value)
        if zeroed is value:
            return None
        return torch.cat([parts[..., :-1, :], zeroed.transpose(1, 2)[..., None, :]], 3).reshape(
            rows, seq, width)
    return hook


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

    projections = None if uses_attention_interface(model) else _projections(model, attention, chosen)
    previous = ALL_ATTENTION_FUNCTIONS.__dict__.get("get_interface")
    lookup = ALL_ATTENTION_FUNCTIONS.get_interface
    hooks = []
    try:
        if projections is None:
            for block in stacks["decoder"]:
                hooks.append(block.register_forward_pre_hook(reset))
            ALL_ATTENTION_FUNCTIONS.get_interface = lambda impl, default: wrap(lookup(impl, default))
        else:  # attention outside the interface: zero at the value projection
            for layer, (proj, groups, head_dim) in projections.items():
                hooks.append(proj.register_forward_hook(_projection_hook(handle, layer, groups, head_dim)))
        yield handle
    finally:
        if projections is None:
            if previous is None:
                ALL_ATTENTION_FUNCTIONS.__dict__.pop("get_interface", None)
            else:
                ALL_ATTENTION_FUNCTIONS.get_interface = previous
        for h in reversed(hooks):
            h.remove()


def _projections(model: Model, attention: str, layers: Iterable[int]) -> dict[int, tuple[nn.Linear, int, int]]:
    """`_value_layout` of the `attention` module of each of `layers` (models outside the interface)."""
    side = "encoder" if attention == "encoder" else "decoder"
    slot = 1 if attention == "cross" else 0
    stack, out = layer_attention(model)[side], {}
    for layer in layers:
        modules = stack[layer]
        if len(modules) <= slot:
            raise ValueError(f"found no {attention} attention module in layer {layer} of the {side} of "
                             f"{type(model).__name__} (a module whose class name ends in 'Attention').")
        out[layer] = _value_layout(modules[slot])
    return out


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

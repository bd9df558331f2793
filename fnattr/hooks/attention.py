"""`eager_attention` and `capture_attention`: attention weights of a forward, model restored on exit.

SDPA and flash kernels never materialize the attention matrix, so the weights come from eager
attention: `eager_attention` switches every (sub-)config of the model to "eager" and restores
each one's own setting on exit, also after an error. `capture_attention` reads the weights with
forward hooks on the modules that the model itself declares as attention outputs
(`_can_record_outputs` in transformers 5), so `output_attentions=True` is never needed (it would
leave transformers' own recording hooks installed on the model). Models that declare none (GPT-J,
Bloom, Falcon: attention outside transformers' attention interface) return their weights second
from each layer's attention module, which is found by its class name (`layer_attention`).

`finite_masks` keeps float64 models finite on padded rows: eager kernels that take the softmax
in float32 turn a float64 mask's minimum into -inf, so a padding query whose keys are all masked
gets NaN weights, and its NaN value reaches real positions as 0 * NaN (Bloom, Gemma2, Llama's
eager kernel). Masks are clamped to float32's minimum, which leaves every real row's weights
exactly as they were (masked keys still get weight 0).
"""

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from fnattr.hooks.value_zeroing import layer_attention, uses_attention_interface
from fnattr.types import Model

Kind = Literal["self", "cross", "encoder"]
KINDS: tuple[str, ...] = Kind.__args__
_RECORD_KEYS = {"attentions": "self", "cross_attentions": "cross"}


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config the model's modules read, sub-configs included."""
    found: dict[int, PretrainedConfig] = {}
    todo = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while todo:
        cfg = todo.pop()
        if id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        subs = (getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}))
        todo += [sub for sub in subs if isinstance(sub, PretrainedConfig)]
    return list(found.values())


@contextmanager
def eager_attention(model: Model) -> Iterator[PreTrainedModel]:
    """Run `model` with eager attention inside the block; every config's setting is restored.

    Uses `PreTrainedModel.set_attn_implementation("eager")`; on exit each config's own
    `_attn_implementation` (and any module attribute of that name) gets its old value back.
    Models outside transformers' attention interface (Falcon) cannot switch; their configs are
    set to "eager" directly, which they read at each forward.

    >>> with eager_attention(model):
    ...     out = model(input_ids=ids, output_attentions=True)   # weights are not None
    """
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"{type(model).__name__} has no `set_attn_implementation`: pass a transformers "
                        "PreTrainedModel (transformers >= 5).")
    configs = [(c, c._attn_implementation) for c in _configs(model)]
    attrs = [(m, vars(m)["_attn_implementation"]) for m in model.modules()
             if "_attn_implementation" in vars(m)]
    try:
        if uses_attention_interface(model) and any(impl != "eager" for _, impl in configs):
            model.set_attn_implementation("eager")
            for module, _ in attrs:
                module._attn_implementation = "eager"
        elif any(impl != "eager" for _, impl in configs):  # Falcon: no switch, reads it at each call
            for cfg, _ in configs:
                cfg._attn_implementation_internal = "eager"
        yield model
    finally:
        for module, impl in reversed(attrs):
            module._attn_implementation = impl
        for cfg, impl in reversed(configs):
            cfg._attn_implementation_internal = impl


# experts implementations known to run in float64 (everything else, `grouped_mm` first, is
# switched to transformers' eager loop there)
_FLOAT64_EXPERTS = (None, "eager", "batched_mm")


def _experts_configs(model: Model) -> list:
    """The configs whose experts implementation a float64 forward cannot run: the model's
    configs and every module's own `config` (transformers' `use_experts_implementation` experts
    read `self.config._experts_implementation` at each call), whatever the architecture."""
    configs = {id(c): c for c in _configs(model)}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            configs.setdefault(id(cfg), cfg)
    return [c for c in configs.values()
            if getattr(c, "_experts_implementation_internal", None) not in _FLOAT64_EXPERTS]


@contextmanager
def eager_experts(model: Model) -> Iterator[None]:
    """Inside the block, a float64 mixture-of-experts model runs its experts with transformers'
    eager loop instead of `grouped_mm` (no float64 kernel) or any other kernel not known to run
    float64; every config's own `_experts_implementation` is restored on exit. The experts are
    found through the configs they read (`_experts_configs`), not by architecture. Other models
    and dtypes are left alone.

    >>> with eager_experts(model):          # a float64 Mixtral, OLMoE, GraniteMoE, ...
    ...     logits = model(input_ids=ids).logits
    """
    float64 = any(p.dtype == torch.float64 for p in model.parameters())
    configs = [(c, c._experts_implementation_internal) for c in _experts_configs(model)] if float64 else []
    try:
        for cfg, _ in configs:
            cfg._experts_implementation_internal = "eager"
        yield
    finally:
        for cfg, impl in reversed(configs):
            cfg._experts_implementation_internal = impl


def _specs(module: nn.Module) -> list[tuple[str, type | None, str | None, str | None, int]]:
    """(kind, class, class-name suffix, layer name, output index) declared by a transformers model."""
    declared = getattr(module, "_can_record_outputs", None) or {}
    out = []
    for key, kind in _RECORD_KEYS.items():
        specs = declared.get(key, [])
        for spec in specs if isinstance(specs, list) else [specs]:
            if isinstance(spec, str):
                out.append((kind, None, spec, None, 1))
            elif isinstance(spec, type):
                out.append((kind, spec, None, None, 1))
            else:
                out.append((kind, spec.target_class, spec.class_name, spec.layer_name, spec.index))
    return out


def _walk(module: nn.Module, path: str, specs: list, found: list) -> None:
    for name, child in module.named_children():
        own = _specs(child) if isinstance(child, PreTrainedModel) else specs
        _walk(child, f"{path}.{name}", own or specs, found)
    for kind, cls, class_name, layer_name, index in specs:
        if cls is not None and not isinstance(module, cls):
            continue
        if cls is None and not path.endswith(class_name or "\0"):
            continue
        if layer_name is not None and f".{layer_name.strip('.')}." not in f"{path}.":
            continue
        found.append((kind, module, index))


def attention_modules(model: Model) -> dict[str, list[tuple[nn.Module, int]]]:
    """Attention modules by kind, in layer order, with the index of the weights in their output.

    "self": decoder self-attention (the only stack of a decoder-only model), "cross": decoder
    cross-attention over the encoder output, "encoder": encoder self-attention.
    """
    found: list = []
    _walk(model, "", _specs(model), found)
    if not found:
        found = _by_layer(model)
    encoder = model.get_encoder() if model.config.is_encoder_decoder else None
    in_encoder = set() if encoder is None else {id(m) for m in encoder.modules()}
    out: dict[str, list[tuple[nn.Module, int]]] = {k: [] for k in KINDS}
    seen: set[int] = set()
    for kind, module, index in found:
        if id(module) in seen:
            continue
        seen.add(id(module))
        kind = "encoder" if id(module) in in_encoder and kind == "self" else kind
        out[kind].append((module, index))
    if not any(out.values()):
        raise ValueError(f"{type(model).__name__} declares no attention modules (`_can_record_outputs`) "
                         "and its layers hold no module whose class name ends in 'Attention'.")
    return out


def _by_layer(model: Model) -> list[tuple[str, nn.Module, int]]:
    """(kind, module, index) from each layer's attention modules, for models that declare none:
    the first is self-attention, a second one cross-attention; weights come second in the output."""
    try:
        stacks = layer_attention(model)
    except ValueError:  # no list of layers either
        return []
    return [(("self", "cross")[slot], module, 1) for layers in stacks.values() for modules in layers
            for slot, module in enumerate(modules[:2])]


_MASK_KWARGS = ("attention_mask", "mask")


@contextmanager
def finite_masks(model: Model) -> Iterator[None]:
    """Inside the block, float64 attention masks reach the attention modules clamped to float32's
    minimum (see the module docstring); nothing changes for other dtypes. Hooks removed on exit.

    >>> with finite_masks(model):            # a float64 Bloom or Gemma2, left-padded rows
    ...     logits = model(input_ids=ids, attention_mask=mask).logits   # finite
    """
    try:
        modules = [m for kind in attention_modules(model).values() for m, _ in kind]
    except (ValueError, AttributeError):  # nothing to clamp where no attention module is known
        modules = []
    low = torch.finfo(torch.float32).min

    def clamp(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        names = [k for k in _MASK_KWARGS
                 if isinstance(kwargs.get(k), Tensor) and kwargs[k].dtype == torch.float64]
        if not names:
            return None
        return args, {**kwargs, **{k: kwargs[k].clamp(min=low) for k in names}}

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(clamp, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@dataclasses.dataclass
class AttentionCapture:
    """Attention weights of the forwards run inside `capture_attention`, by kind.

    `weights[kind]` holds one `[rows, heads, query, key]` tensor per layer and forward, in call
    order; `clear()` empties it between forwards.
    """

    weights: dict[str, list[Tensor]]

    def clear(self) -> None:
        for layers in self.weights.values():
            layers.clear()


@contextmanager
def capture_attention(
    model: Model, kinds: Iterable[str] = KINDS
) -> Iterator[AttentionCapture]:
    """Record the attention weights of every forward inside the block (eager attention).

    A padding query whose keys are all masked gets NaN weights in eager attention when a float64
    model's softmax runs in float32 (Llama), and its NaN would reach real positions as 0 * NaN in
    the next layer; such NaNs are set to 0 in the module's output (real rows never have them).

    >>> with capture_attention(model, ["self"]) as cap:
    ...     model(input_ids=ids)
    >>> cap.weights["self"][0].shape    # [batch, heads, seq, seq] of layer 0
    """
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"`kinds` names {kind!r}: use some of {list(KINDS)}.")
    modules = attention_modules(model)  # validate before touching the model
    capture = AttentionCapture({k: [] for k in kinds})
    handles = []

    def make_hook(kind: str, index: int):
        def hook(module: nn.Module, args: tuple, output) -> tuple | None:
            weights = output[index] if isinstance(output, tuple) else None
            if not isinstance(weights, Tensor):
                raise RuntimeError(f"{type(module).__name__} returned no attention weights although "
                                   "eager attention is on: this model cannot report its attention.")
            capture.weights[kind].append(weights.detach().nan_to_num(0.0))
            if weights.isnan().any():  # see `capture_attention`: masked rows only, never real ones
                return tuple(o.nan_to_num(0.0) if isinstance(o, Tensor) else o for o in output)
            return None
        return hook

    with eager_attention(model):
        try:
            for kind in kinds:
                for module, index in modules[kind]:
                    handles.append(module.register_forward_hook(make_hook(kind, index)))
            yield capture
        finally:
            for handle in reversed(handles):
                handle.remove()

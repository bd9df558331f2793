"""`randomized`: re-initialise chosen layers with seeded random values, restored bit-exactly on exit.

For the model-randomisation sanity check (Adebayo et al. 2018, arXiv:1810.03292):
`fnattr.sanity.model_randomization` runs a method inside `randomized` for each stage.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fnattr.hooks.layer import resolve_layers as _resolve

LayersSpec = str | nn.Module | Sequence[str | nn.Module]
# `init(original, generator) -> new values`: `original` is a detached copy of the parameter,
# `generator` a seeded CPU generator; the result is cast to the parameter's dtype and device.
InitFn = Callable[[Tensor, torch.Generator], Tensor]
Tied = Literal["raise", "untie", "share"]
TIED = ("raise", "untie", "share")


def normal_like(original: Float[Tensor, "*shape"], generator: torch.Generator) -> Float[Tensor, "*shape"]:
    """I.i.d. normal values with `original`'s own mean and standard deviation (over all its
    entries), drawn on the CPU from `generator` (float64 for float64 tensors, else float32).

    A constant tensor (std 0, e.g. a LayerNorm gain of an untrained model) keeps its value."""
    wide = torch.float64 if original.dtype == torch.float64 else torch.float32
    values = original.detach().to(wide)
    std, mean = torch.std_mean(values, correction=0)
    z = torch.randn(original.shape, generator=generator, dtype=wide)
    return z * std.cpu() + mean.cpu()


# Named initialisations. Not transformers' `PreTrainedModel._init_weights`: it takes no generator
# (its `transformers.initialization.normal_` calls draw from the global torch RNG), skips tensors
# flagged `_is_hf_initialized`, resets norms to 1 and biases to 0 rather than drawing them, and
# rewrites buffers such as rotary `inv_freq`. A callable `init` can draw any scheme from the
# generator, e.g. `lambda t, g: torch.nn.init.trunc_normal_(t, std=0.02, generator=g)`.
INITS: Mapping[str, InitFn] = MappingProxyType({"normal": normal_like})


def layer_stack(model: nn.Module) -> tuple[str, ...]:
    """Names of `model`'s transformer blocks, top first: the reverse of the order they run in.

    Decoder-only: the last block first, down to the first. Encoder-decoder: the decoder's blocks
    top to bottom, then the encoder's top to bottom (the encoder runs before the decoder, so its
    blocks are further from the logits). A stack's blocks are its largest `nn.ModuleList` whose
    items share one class, among the lists not nested inside another such list (a T5 block's
    `layer` list is inside `block`).

    >>> layer_stack(gpt2)     # ('transformer.h.1', 'transformer.h.0')
    >>> layer_stack(bart)     # ('model.decoder.layers.1', 'model.decoder.layers.0',
    ...                       #  'model.encoder.layers.1', 'model.encoder.layers.0')
    """
    names = {id(m): n for n, m in reversed(list(model.named_modules()))}  # first name wins
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        stacks = [model.get_decoder(), model.get_encoder()]
    else:
        try:
            stack = model.get_decoder()
        except (AttributeError, NotImplementedError):
            stack = None
        stacks = [model if stack is None or id(stack) not in names else stack]
    found: list[str] = []
    for stack in stacks:
        blocks = _blocks(stack)
        if blocks is None:
            raise ValueError(f"{type(model).__name__}'s {type(stack).__name__} holds no nn.ModuleList "
                             "of blocks of one class: name the layers to randomise yourself.")
        found += [names[id(b)] for b in reversed(blocks)]
    return tuple(found)


def _blocks(stack: nn.Module) -> nn.ModuleList | None:
    """The largest outermost `nn.ModuleList` in `stack` whose items share one class."""
    best: nn.ModuleList | None = None
    inside: set[int] = set()
    for module in stack.modules():  # parents before children
        if id(module) in inside or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) != 1:
            continue
        inside |= {id(m) for m in module.modules()}
        if best is None or len(module) > len(best):
            best = module
    return best


@dataclasses.dataclass(frozen=True)
class Redraw:
    """One parameter that `randomized` redraws: `name` (as named inside the layers), the
    parameter, and, for `tied="untie"`, the (module, attribute) slots inside the layers that
    get their own copy while modules outside keep the original."""

    name: str
    param: nn.Parameter
    untie: tuple[tuple[nn.Module, str], ...] = ()


def resolve_layers(model: nn.Module, layers: LayersSpec) -> list[tuple[str, nn.Module]]:
    """(name, module) of each distinct module that `layers` names: dotted names or modules."""
    modules = _resolve(model, layers, arg="layers", examples=layer_stack(model))
    names = {id(m): n for n, m in reversed(list(model.named_modules()))}
    return [(names[id(m)], m) for m in modules]


def plan(model: nn.Module, layers: LayersSpec, *, tied: Tied = "raise") -> list[Redraw]:
    """The parameters `randomized(model, layers, tied=tied)` would redraw; raises ValueError
    (naming the argument) for unknown layers, non-float parameters or tied weights under
    `tied="raise"`. Reads the model, changes nothing."""
    if tied not in TIED:
        raise ValueError(f"`tied`={tied!r}: use one of {TIED}.")
    chosen = resolve_layers(model, layers)
    inside = {id(m) for _, root in chosen for m in root.modules()}
    slots: dict[int, list[tuple[str, nn.Module, str]]] = {}  # every module slot of every parameter
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((f"{mod_name}.{attr}".lstrip("."), module, attr))
    redraws: dict[int, Redraw] = {}
    for prefix, root in chosen:
        for name, p in root.named_parameters(prefix=prefix):
            if id(p) in redraws:
                continue
            if not p.is_floating_point():
                raise ValueError(f"`layers` includes {name!r} of dtype {p.dtype}: only floating-point "
                                 "parameters can be redrawn; leave its module out of `layers`.")
            outside = [n for n, m, _ in slots[id(p)] if id(m) not in inside]
            if outside and tied == "raise":
                raise ValueError(
                    f"`layers` includes {name!r}, a tensor that {outside} outside `layers` shares "
                    "(tied weights): add those modules to `layers`, or pass tied='untie' (only the "
                    "named layers get new values) or tied='share' (the shared tensor changes "
                    "everywhere it is used).")
            untie = tuple((m, a) for _, m, a in slots[id(p)] if id(m) in inside)
            redraws[id(p)] = Redraw(name, p, untie if outside and tied == "untie" else ())
    return list(redraws.values())


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, parameter name): a parameter's new values do not depend
    on which other layers are redrawn with it, nor on the device."""
    digest = hashlib.sha256(f"fnattr.randomized/{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _new_values(r: Redraw, seed: int, init: InitFn) -> Tensor:
    new = init(r.param.detach().clone(), _generator(seed, r.name))
    if not isinstance(new, Tensor) or new.shape != r.param.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(f"`init` returned {got} for {r.name!r} of shape {tuple(r.param.shape)}: "
                         "it must return a tensor of the parameter's shape.")
    return new.to(device=r.param.device, dtype=r.param.dtype)


@contextmanager
def randomized(
    model: nn.Module, layers: LayersSpec, *, seed: int = 0, init: str | InitFn = "normal",
    tied: Tied = "raise",
) -> Iterator[tuple[str, ...]]:
    """Re-initialise every parameter of `layers` with seeded random values; restore on exit.

    `layers`: module names ("transformer.h.1"), modules, or a list of them (`layer_stack(model)`
    names the blocks). `init="normal"` draws i.i.d. normal values with each tensor's own mean and
    std (`normal_like`); or pass `init(original, generator) -> Tensor`. Every parameter gets a
    CPU `torch.Generator` seeded from (`seed`, its name): the global `random`, numpy and torch
    generators are never used. Shapes, dtypes, devices, `requires_grad` and `.grad` stay as they
    were. On exit, also on an exception or KeyboardInterrupt, every parameter is restored
    bit-exactly from a copy taken before.

    Tied weights (a tensor used by a module outside `layers`, such as input embeddings tied to
    the output layer): `tied="raise"` (default) refuses before touching the model; `"untie"`
    gives the modules inside `layers` their own randomised copy for the duration, so modules
    outside keep the original (the tie is restored on exit); `"share"` redraws the shared tensor,
    which then changes everywhere it is used.

    Yields the names of the redrawn parameters.

    >>> with randomized(model, layer_stack(model)[:1], seed=0) as names:
    ...     logits = model(input_ids=ids).logits    # top block randomised
    """
    if isinstance(init, str) and init not in INITS:
        raise ValueError(f"`init`={init!r}: use one of {sorted(INITS)} or a function "
                         "(original, generator) -> tensor.")
    draw = INITS[init] if isinstance(init, str) else init
    redraws = plan(model, layers, tied=tied)  # validate before touching the model
    saved: list[tuple[nn.Parameter, Tensor]] = []
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for r in redraws:
                new = _new_values(r, seed, draw)
                if r.untie:
                    copy = nn.Parameter(new, requires_grad=r.param.requires_grad)
                    for module, attr in r.untie:
                        swapped.append((module, attr, module._parameters[attr]))
                        module._parameters[attr] = copy
                else:
                    saved.append((r.param, r.param.detach().clone()))
                    r.param.copy_(new)
        yield tuple(r.name for r in redraws)
    finally:
        with torch.no_grad():
            for module, attr, original in reversed(swapped):
                module._parameters[attr] = original
            for param, values in reversed(saved):
                param.copy_(values)

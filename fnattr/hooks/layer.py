"""`layer_hooks`: record and replace the outputs of chosen modules, restored on exit."""

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

Replacement = Tensor | Callable[[Tensor], Tensor]
LayerSpec = str | nn.Module | Sequence[str | nn.Module]


def resolve_layers(model: nn.Module, layer: LayerSpec, *, arg: str = "layer",
                   examples: Sequence[str] | None = None) -> list[nn.Module]:
    """The distinct modules that `layer` names: a dotted name, a module of `model`, or several.

    Errors name the argument `arg` and suggest `examples` (default: the first module names)."""
    specs = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
    if examples is None:
        examples = [n for n, _ in model.named_modules() if n][:8]
    if not specs:
        raise ValueError(f"`{arg}` names no module: pass module names such as {list(examples)[:2]}.")
    found: dict[int, nn.Module] = {}
    owned = {id(m) for m in model.modules()}
    for spec in specs:
        if isinstance(spec, str):
            try:
                module = model.get_submodule(spec)
            except AttributeError:
                raise ValueError(f"`{arg}`={spec!r} is not a module of {type(model).__name__}: "
                                 f"use a name from model.named_modules(), e.g. {list(examples)}."
                                 ) from None
        elif isinstance(spec, nn.Module):
            module = spec
            if id(module) not in owned:
                raise ValueError(f"`{arg}` ({type(module).__name__}) is not a submodule of "
                                 f"{type(model).__name__}: pass one of its modules.")
        else:
            raise TypeError(f"`{arg}` holds a {type(spec).__name__}: pass module names or modules.")
        found.setdefault(id(module), module)
    return list(found.values())


def _main(output: object, module: nn.Module) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"{type(module).__name__} returns {type(output).__name__}: name a module whose "
                    "output is a tensor or a tuple that starts with one.")


def _rebuild(output: object, new: Tensor) -> object:
    if isinstance(output, Tensor):
        return new
    return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])


@dataclasses.dataclass
class LayerHandle:
    """Records every call's output of the hooked modules, in call order, and replaces them.

    `replace(a, b, ...)` queues replacements for the next calls: a tensor stands in for the
    output (same shape), a function maps the output to its stand-in. `take()` returns the
    outputs recorded since the last `take()` (after replacement) and forgets them.
    """

    modules: list[nn.Module]
    _queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    _seen: list[Tensor] = dataclasses.field(default_factory=list)

    def replace(self, *items: Replacement) -> None:
        self._queue.extend(items)

    def take(self) -> list[Tensor]:
        seen, self._seen = self._seen, []
        return seen

    def check_used(self) -> None:
        if self._queue:
            self._queue.clear()
            raise RuntimeError("queued layer replacements were not used by the forward pass.")

    def _hook(self, module: nn.Module, args: tuple, output: object) -> object:
        main = _main(output, module)
        if not self._queue:
            self._seen.append(main)
            return None
        item = self._queue.popleft()
        new = item(main) if callable(item) else item
        if new.shape != main.shape:
            self._queue.clear()
            raise ValueError(f"the replacement for {type(module).__name__}'s output has shape "
                             f"{tuple(new.shape)}; the module computed {tuple(main.shape)}.")
        new = new.to(main.dtype)
        self._seen.append(new)
        return _rebuild(output, new)


def _check_not_output(model: nn.Module, modules: list[nn.Module]) -> None:
    """Refuse the output layer: fnattr computes the logits only where it scores steps, so its
    output does not cover every position (and holds logits, not activations)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not any(m is head or any(m is s for s in head.modules()) for m in modules):
        return
    name = next((n for n, m in model.named_modules() if m is head), type(head).__name__)
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    example = f"'{blocks[-1]}.0' or a final norm" if blocks else "a module before it"
    raise ValueError(f"`layer`={name!r} is the output layer (its logits are computed only at the "
                     f"attributed steps): name a module whose output covers every position, e.g. "
                     f"{example}.")


@contextmanager
def layer_hooks(model: nn.Module, layer: LayerSpec) -> Iterator[LayerHandle]:
    """Record (and optionally replace) the output of `layer` on each call; unhooked on exit.

    `layer` is a module name ("model.layers.0"), a module of `model`, or a sequence of them
    (their calls share one record, in call order). A module returning a tuple has its first
    element recorded and replaced; the rest passes through.

    >>> with layer_hooks(model, "model.layers.0.mlp") as h:
    ...     model(input_ids=ids)
    ...     (act,) = h.take()
    ...     h.replace(act * 0)          # the next call of the MLP returns zeros
    ...     model(input_ids=ids)
    """
    modules = resolve_layers(model, layer)  # validate before touching the model
    _check_not_output(model, modules)
    handle = LayerHandle(modules)
    hooks = []
    try:
        for module in modules:
            hooks.append(module.register_forward_hook(handle._hook))
        yield handle
    finally:
        for h in reversed(hooks):
            h.remove()

"""`compile`: `torch.compile` a model once and reuse it for every method and batch shape.

A plain `torch.compile(model)` retraces for each new batch size and length: the methods replace
the input embeddings through a hook on the embedding module (`fnattr.hooks.embedding_hooks`),
and dynamo gives every tensor it reaches through a built-in `nn.Module` a static shape, so it
guards on the exact size of each replacement. After 8 traces (`torch._dynamo.config.
recompile_limit`) it silently runs the model eagerly.

`compile` traces with dynamic batch and sequence dims instead. Within one process a compiled
model then traces at most once per combination of
  * grad mode: on for gradient methods, off for perturbation methods and clean forwards;
  * rows in one forward: 1, or 2 and more (dynamo always specialises a size of 1);
so four graphs serve saliency, integrated gradients and occlusion at any batch size, length and
`n_steps` (the tests count them).

`torch._functorch.config.donated_buffer` is off inside the compiled calls and inside
`fnattr.engine.step_gradients` (it is read both when a graph compiles and when its backward
runs): a dynamic-shape graph compiles its backward with its forward, and with donated buffers
that backward refuses `retain_graph=True`, which per-step gradients need. Outside them the
process's setting is untouched.
"""

import torch
from torch import nn

from fnattr.types import Model


class CompiledModel(nn.Module):
    """A model whose calls run its `torch.compile`d forward (see `compile`); every other
    attribute (`config`, `get_input_embeddings`, `device`, ...) is the model's own."""

    def __init__(self, model: nn.Module, compiled: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model  # the name torch.compile's wrapper uses (fnattr.hooks.frozen)
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: no second copy

    def forward(self, *args, **kwargs):
        # read while tracing: a replacement embedding, reached through the hooked nn.Embedding,
        # gets dynamic dims like the inputs (the previous value is back on return)
        with (torch._dynamo.config.patch(force_nn_module_property_static_shapes=False),
              torch._functorch.config.patch(donated_buffer=False)):
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


def compile(model: Model, **options) -> CompiledModel:
    """`torch.compile(model, dynamic=True, **options)` for attribution: compiled once, reused
    across methods, batch sizes and lengths (at most four graphs; see the module docstring).

    The model itself is not changed; hooks and flags set on it apply to the compiled calls.

    >>> fast = fnattr.compiled.compile(model)          # options as torch.compile's
    >>> saliency(fast, batch); occlusion(fast, batch)  # the second call traces once, no more
    """
    options.setdefault("dynamic", True)
    return CompiledModel(model, torch.compile(model, **options))

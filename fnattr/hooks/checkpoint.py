"""`checkpointed`: trade compute for memory in gradient methods, restored on exit.

Inside the block each transformer block of the model keeps only its inputs during the forward
and recomputes its activations when the backward reaches it (`torch.utils.checkpoint`,
non-reentrant, so it composes with the engine's batched backward). A long prompt's activations
then cost one block's worth instead of every block's; the backward runs each block's forward
once more. Scores are unchanged: the recomputation is the same arithmetic. DeepLIFT's rules
record each block's forward once and refuse to run inside it.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.checkpoint import checkpoint

from fnattr.hooks.layer import LayerSpec, resolve_layers
from fnattr.hooks.randomized import layer_stack
from fnattr.types import Model


def _wrapped(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run.__wrapped__ = forward
    run.fnattr_checkpointed = True
    return run


def is_checkpointed(model: Model) -> bool:
    """Whether some block of `model` runs inside `checkpointed`."""
    return any(getattr(vars(m).get("forward"), "fnattr_checkpointed", False) for m in model.modules())


@contextmanager
def checkpointed(model: Model, layers: LayerSpec | None = None) -> Iterator[None]:
    """Recompute each block's activations in the backward instead of keeping them (`layers`:
    module names or modules; default every transformer block, `randomized.layer_stack`). The
    model's own `forward` methods are back on exit, also on error.

    >>> with checkpointed(model):
    ...     out = integrated_gradients(model, batch)   # same scores, less activation memory
    """
    blocks = resolve_layers(model, layer_stack(model) if layers is None else layers, arg="layers")
    if any("forward" in vars(b) for b in blocks):
        raise RuntimeError("a block's forward is already replaced (nested `checkpointed`, or "
                           "another patch): leave that block first.")
    try:
        for block in blocks:
            block.forward = _wrapped(block.forward)
        yield
    finally:
        for block in blocks:
            vars(block).pop("forward", None)

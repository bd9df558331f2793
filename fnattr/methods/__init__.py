"""Attribution methods: pure functions `(model, batch, target_fn, **options) -> AttributionTensors`.

Each method declares itself in its own file (`fnattr.registry.attribution_method`); `METHODS` is
the read-only table of them by name, and each is importable from here (`fnattr.methods.saliency`).
"""

from collections.abc import Callable, Mapping

from fnattr import registry

# name -> function, read from the method files (CLI, `fnattr.attribute`, `compare_methods`)
METHODS: Mapping[str, Callable] = registry.Methods()
globals().update({name: registry.function(name) for name in registry.specs()})

__all__ = ["METHODS", *registry.specs()]


def __getattr__(name: str) -> Callable:
    """`fnattr.methods.NAME` for a method file added to the package's path after import."""
    if name in registry.specs():
        return registry.function(name)
    raise AttributeError(f"module 'fnattr.methods' has no attribute {name!r}")

"""Attribution methods: pure functions `(model, batch, target_fn, **options) -> AttributionTensors`."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

from fnattr.methods.gradient import input_x_gradient as input_x_gradient
from fnattr.methods.gradient import saliency as saliency
from fnattr.methods.integrated_gradients import integrated_gradients as integrated_gradients

# A read-only table of the methods above, for lookup by name (CLI, `fnattr.attribute`).
METHODS: Mapping[str, Callable] = MappingProxyType({
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
})

__all__ = ["METHODS", "input_x_gradient", "integrated_gradients", "saliency"]

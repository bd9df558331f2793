"""Attribution methods: pure functions `(model, batch, target_fn, **options) -> AttributionTensors`."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

from fnattr.methods.attention import attention as attention
from fnattr.methods.deeplift import deeplift as deeplift
from fnattr.methods.deeplift import layer_deeplift as layer_deeplift
from fnattr.methods.discretized_ig import discretized_integrated_gradients as discretized_integrated_gradients
from fnattr.methods.gradient import input_x_gradient as input_x_gradient
from fnattr.methods.gradient import saliency as saliency
from fnattr.methods.gradient_shap import gradient_shap as gradient_shap
from fnattr.methods.integrated_gradients import integrated_gradients as integrated_gradients
from fnattr.methods.layer import layer_gradient_x_activation as layer_gradient_x_activation
from fnattr.methods.layer import layer_integrated_gradients as layer_integrated_gradients
from fnattr.methods.lime import lime as lime
from fnattr.methods.lrp import attnlrp as attnlrp
from fnattr.methods.lrp import cp_lrp as cp_lrp
from fnattr.methods.occlusion import occlusion as occlusion
from fnattr.methods.reagent import reagent as reagent
from fnattr.methods.sequential_ig import sequential_integrated_gradients as sequential_integrated_gradients
from fnattr.methods.value_zeroing import value_zeroing as value_zeroing

# A read-only table of the methods above, for lookup by name (CLI, `fnattr.attribute`).
METHODS: Mapping[str, Callable] = MappingProxyType({
    # gradients
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "deeplift": deeplift,
    "gradient_shap": gradient_shap,
    "discretized_integrated_gradients": discretized_integrated_gradients,
    "sequential_integrated_gradients": sequential_integrated_gradients,
    # LRP (Gradient x Input under LRP rules)
    "attnlrp": attnlrp,
    "cp_lrp": cp_lrp,
    # layers
    "layer_integrated_gradients": layer_integrated_gradients,
    "layer_gradient_x_activation": layer_gradient_x_activation,
    "layer_deeplift": layer_deeplift,
    # internals
    "attention": attention,
    "value_zeroing": value_zeroing,
    # perturbations
    "occlusion": occlusion,
    "lime": lime,
    "reagent": reagent,
})

__all__ = ["METHODS", *METHODS]

"""Context managers that change a model temporarily and always restore it."""

from fnattr.hooks.attention import AttentionCapture as AttentionCapture
from fnattr.hooks.attention import capture_attention as capture_attention
from fnattr.hooks.attention import eager_attention as eager_attention
from fnattr.hooks.attention import eager_experts as eager_experts
from fnattr.hooks.attention import finite_masks as finite_masks
from fnattr.hooks.checkpoint import checkpointed as checkpointed
from fnattr.hooks.dropout import enable_dropout as enable_dropout
from fnattr.hooks.embedding import EmbeddingHandle as EmbeddingHandle
from fnattr.hooks.embedding import embedding_hooks as embedding_hooks
from fnattr.hooks.embedding import embedding_modules as embedding_modules
from fnattr.hooks.frozen import frozen as frozen
from fnattr.hooks.layer import LayerHandle as LayerHandle
from fnattr.hooks.layer import layer_hooks as layer_hooks
from fnattr.hooks.lrp import lrp_rules as lrp_rules
from fnattr.hooks.randomized import layer_stack as layer_stack
from fnattr.hooks.randomized import randomized as randomized
from fnattr.hooks.value_zeroing import ValueZeroingHandle as ValueZeroingHandle
from fnattr.hooks.value_zeroing import value_zeroing as value_zeroing

__all__ = [
    "AttentionCapture", "EmbeddingHandle", "LayerHandle", "ValueZeroingHandle",
    "capture_attention", "checkpointed", "eager_attention", "eager_experts", "embedding_hooks", "embedding_modules",
    "enable_dropout", "finite_masks", "frozen", "layer_hooks", "lrp_rules", "layer_stack", "randomized", "value_zeroing",
]

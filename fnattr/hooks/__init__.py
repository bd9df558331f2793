"""Context managers that change a model temporarily and always restore it."""

from fnattr.hooks.embedding import EmbeddingHandle as EmbeddingHandle
from fnattr.hooks.embedding import embedding_hooks as embedding_hooks
from fnattr.hooks.embedding import embedding_modules as embedding_modules
from fnattr.hooks.frozen import frozen as frozen

__all__ = ["EmbeddingHandle", "embedding_hooks", "embedding_modules", "frozen"]

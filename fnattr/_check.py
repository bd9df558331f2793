"""Run-time shape and type checking: jaxtyping shapes, checked by beartype."""

from beartype import beartype
from jaxtyping import jaxtyped

typechecked = jaxtyped(typechecker=beartype)

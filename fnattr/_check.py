"""Run-time shape and type checking: jaxtyping shapes, checked by beartype.

beartype checks one random item of each container it meets, drawn with `random.getrandbits`: every
checked call would shift the user's seeded `random` sequence. `typechecked` puts the global
`random` state back after each call, so a method leaves the user's seeded sequence where it was.
"""

import functools
import random
from collections.abc import Callable
from typing import TypeVar

from beartype import beartype
from jaxtyping import jaxtyped

_checked = jaxtyped(typechecker=beartype)
T = TypeVar("T")


def _keeping_random(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        state = random.getstate()
        try:
            return fn(*args, **kwargs)
        finally:
            random.setstate(state)

    return call


def typechecked(obj: T) -> T:
    """`jaxtyped(typechecker=beartype)` that leaves Python's global `random` state as it was: a
    function, or a dataclass (its `__init__` checks the fields)."""
    checked = _checked(obj)
    if isinstance(checked, type):
        checked.__init__ = _keeping_random(checked.__init__)
        return checked
    return _keeping_random(checked)

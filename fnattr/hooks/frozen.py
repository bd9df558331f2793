"""`frozen`: eval mode and no parameter gradients for the duration of an attribution."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode with `requires_grad=False` on every parameter; restore on exit.

    Gradients are then taken with respect to inputs only: no parameter `.grad` is touched, and
    autograd keeps no state for weight gradients.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for m, mode in reversed(modes):
            m.training = mode
        for p, flag in reversed(flags):
            p.requires_grad_(flag)

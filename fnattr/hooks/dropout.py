"""`enable_dropout`: dropout modules (and only those) in training mode, restored on exit."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Every `torch.nn` dropout module of `model` (functional dropout inside attention is not one)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]


@contextmanager
def enable_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch the dropout modules of `model` to training mode, every other module untouched.

    For Monte-Carlo dropout (Gal & Ghahramani 2016, arXiv:1506.02142): the model stays in eval
    mode except for its dropout, so normalisation layers and cached behaviour are unchanged. Each
    module's `training` flag is restored on exit, also on error. Yields the dropout modules.

    >>> with frozen(model), enable_dropout(model):
    ...     logits = model(ids).logits   # a sample with dropout
    """
    modules = dropout_modules(model)
    flags = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.training = True
        yield modules
    finally:
        for m, flag in reversed(flags):
            m.training = flag

"""`enable_dropout`: dropout (and only dropout) in training mode, restored on exit.

Dropout comes in two forms: `torch.nn` dropout modules, and functional calls
(`F.dropout(x, p=self.dropout, training=self.training)`, an attention interface's
`dropout=self.dropout if self.training else 0`) inside modules that hold their rate in a float
attribute read from the config (`config.dropout`, `config.attention_dropout`, ...), e.g. Bart,
Marian. `enable_dropout` switches both on.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Every `torch.nn` dropout module of `model` (functional dropout inside attention is not one)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]


def _rates(module: nn.Module) -> dict[str, float]:
    """The module's own float attributes named like a dropout rate (`dropout`, `attention_dropout`,
    `activation_dropout`, ...), which it passes to functional dropout gated by `self.training`."""
    return {k: v for k, v in vars(module).items()
            if "dropout" in k and isinstance(v, float) and not isinstance(v, bool)}


def functional_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of `model` (not `torch.nn` dropout modules) that may call dropout functionally:
    those with a positive rate in a float attribute named like `dropout` (Bart and Marian
    layers), and those owning a dropout module with p > 0, whose rate they may pass on gated by
    their own `training` flag (GPT2's attention with SDPA: `self.attn_dropout.p if self.training`)."""
    def owns(m: nn.Module) -> bool:
        return any(isinstance(c, DROPOUT_TYPES) and c.p > 0 for c in m.children())

    return [m for m in model.modules() if not isinstance(m, DROPOUT_TYPES)
            and (any(p > 0 for p in _rates(m).values()) or owns(m))]


def has_dropout(model: nn.Module) -> bool:
    """Whether `enable_dropout(model)` changes any forward: a dropout module or a functional
    dropout rate above 0."""
    return (any(getattr(m, "p", 0) > 0 for m in dropout_modules(model))
            or bool(functional_dropout_modules(model)))


@contextmanager
def _no_layerdrop(modules: list[nn.Module]) -> Iterator[None]:
    """`layerdrop` rates (skip whole layers in training mode) at 0 for the body, restored after:
    switching a module to training mode must add dropout, not skip layers."""
    saved = [(m, k, v) for m in modules for k, v in vars(m).items()
             if "layerdrop" in k and isinstance(v, float) and v > 0]
    try:
        for m, k, _ in saved:
            setattr(m, k, 0.0)
        yield
    finally:
        for m, k, v in reversed(saved):
            setattr(m, k, v)


@contextmanager
def enable_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch the dropout of `model` to training mode: its dropout modules, and the modules that
    call dropout functionally with a positive rate (`functional_dropout_modules`; their
    `layerdrop` rates are held at 0 meanwhile). Every other module is untouched.

    For Monte-Carlo dropout (Gal & Ghahramani 2016, arXiv:1506.02142): the model stays in eval
    mode except for its dropout, so normalisation layers and cached behaviour are unchanged. Each
    module's `training` flag (and layerdrop rate) is restored on exit, also on error. Yields the
    modules switched.

    >>> with frozen(model), enable_dropout(model):
    ...     logits = model(ids).logits   # a sample with dropout
    """
    functional = functional_dropout_modules(model)
    modules = dropout_modules(model) + functional
    flags = [(m, m.training) for m in modules]
    with ExitStack() as stack:
        try:
            stack.enter_context(_no_layerdrop(functional))
            for m in modules:
                m.training = True
            yield modules
        finally:
            for m, flag in reversed(flags):
                m.training = flag

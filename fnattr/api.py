"""`attribute`: prepare a batch and run one method by name, in one call."""

from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fnattr.batch import prepare
from fnattr.methods import METHODS
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import TargetFn


def get_method(method: str | Callable) -> Callable:
    """The method function for `method` (a name from `fnattr.methods.METHODS`, or a function)."""
    if callable(method):
        return method
    if method not in METHODS:
        raise ValueError(f"`method`={method!r} is unknown: use one of {sorted(METHODS)}.")
    return METHODS[method]


def attribute(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    *,
    method: str | Callable = "saliency",
    target_fn: TargetFn = probability,
    max_new_tokens: int = 16,
    generate_kwargs: dict[str, Any] | None = None,
    **method_args: Any,
) -> AttributionTensors:
    """Tokenize, generate (or force `targets`), and attribute with `method`, in one call.

    >>> out = attribute(model, tok, "The capital of France is", method="integrated_gradients",
    ...                 max_new_tokens=4, n_steps=32)
    """
    fn = get_method(method)  # fail on a bad name before generating
    batch = prepare(model, tokenizer, sources, targets, max_new_tokens=max_new_tokens,
                    **(generate_kwargs or {}))
    return fn(model, batch, target_fn, **method_args)

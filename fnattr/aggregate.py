"""Pure functions over AttributionTensors: reduce the `*extra` dimensions, normalize."""

import json
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fnattr.result import AttributionTensors

Reducer = Callable[[Tensor, tuple[int, ...]], Tensor]

REDUCERS: dict[str, Reducer] = {
    "sum": lambda t, d: t.sum(d),
    "mean": lambda t, d: t.mean(d),
    "l2": lambda t, d: torch.linalg.vector_norm(t, ord=2, dim=d),
    "max": lambda t, d: t.amax(d),
    "absmax": lambda t, d: t.flatten(-len(d)).gather(
        -1, t.flatten(-len(d)).abs().argmax(-1, keepdim=True)).squeeze(-1),
}


def _reducer(how: str | Reducer) -> Reducer:
    if callable(how):
        return how
    if how not in REDUCERS:
        raise ValueError(f"`how`={how!r} is not a reduction: use one of {sorted(REDUCERS)} or a "
                         "function (tensor, dims) -> tensor.")
    return REDUCERS[how]


def reduce(
    out: AttributionTensors, how: str | Reducer = "sum", dims: Sequence[str] | None = None
) -> AttributionTensors:
    """Reduce the named `*extra` dimensions (default: all) of `source` and `target` with `how`.

    >>> reduce(out, "l2").source.shape   # [batch step src]
    """
    names = tuple(out.extra_dims if dims is None else dims)
    unknown = [n for n in names if n not in out.extra_dims]
    if unknown:
        raise ValueError(f"`dims` {unknown} are not among the result's extra dims {out.extra_dims}.")
    if not names:
        return out
    fn = _reducer(how)
    # Move the reduced dims last (in any order the caller named them), then reduce them together.
    keep = [d for d in out.extra_dims if d not in names]
    order = [3 + out.extra_dims.index(d) for d in (*keep, *names)]
    axes = tuple(range(-len(names), 0))

    def apply(t: Tensor | None) -> Tensor | None:
        return None if t is None else fn(t.permute(0, 1, 2, *order), axes)

    meta = dict(out.meta)
    steps = json.loads(meta.get("aggregations", "[]")) + [[getattr(how, "__name__", how), list(names)]]
    meta["aggregations"] = json.dumps(steps)
    return out.replace(source=apply(out.source), target=apply(out.target),
                       extra_dims=tuple(keep), meta=meta)

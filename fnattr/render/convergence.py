"""Which steps of a path method did not converge, read from `meta["completeness"]` (written by
the path methods) or, failing that, judged from `delta` against the attributed step score.

`meta["completeness"]` is JSON: {"tolerance": 0.05, "relative_error": [[float or null per step]
per row], "unconverged": [[row, k], ...], "points": [[int per step] per row] or an int}, where k
indexes `out.steps`; any key may be missing.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fnattr.result import AttributionTensors

TOLERANCE = 0.05  # |delta| / |step score| above which a step is flagged when no record says more


def read_meta(out: AttributionTensors, key: str, default: Any) -> Any:
    """`out.meta[key]` parsed as JSON; `default` when absent or not JSON."""
    try:
        return json.loads(out.meta[key]) if key in out.meta else default
    except (TypeError, ValueError):
        return default


def method_args(out: AttributionTensors) -> dict[str, Any]:
    """The options the method was called with (`meta["args"]`), or {} where none are recorded."""
    args = read_meta(out, "args", {})
    return args if isinstance(args, dict) else {}


@dataclass(frozen=True)
class Convergence:
    """Steps `(row, k)` (k indexes `out.steps`) whose completeness error is too large.

    `bound`: the rule's threshold, e.g. "5% of |f(x) - f(baseline)|"; `recorded`: whether it
    comes from the method's own record (`meta["completeness"]`) or from `delta` against the step
    score; `error[(row, k)]`: |delta| relative to the quantity in the rule, where known;
    `points[row]`: points on the path, "" when unknown.
    """

    bound: str
    recorded: bool
    unconverged: frozenset[tuple[int, int]]
    error: Mapping[tuple[int, int], float]
    points: tuple[str, ...]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _points(value: Any) -> str:
    if _is_int(value):
        return str(value)
    ints = sorted({v for v in value if _is_int(v)}) if isinstance(value, list) else []
    return "" if not ints else str(ints[0]) if len(ints) == 1 else f"{ints[0]}-{ints[-1]}"


def _from_record(out: AttributionTensors, rec: dict) -> Convergence:
    """Parse `meta["completeness"]`, tolerating missing or malformed keys."""
    n, n_steps = out.source.shape[0], len(out.steps)
    tol = rec.get("tolerance")
    tol = float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) else TOLERANCE
    rel = rec.get("relative_error")
    error = {(b, k): abs(float(e)) for b, r in enumerate(rel if isinstance(rel, list) else [])
             if b < n and isinstance(r, list) for k, e in enumerate(r)
             if k < n_steps and isinstance(e, (int, float)) and not isinstance(e, bool)}
    bad = rec.get("unconverged")
    if isinstance(bad, list):
        flagged = {(p[0], p[1]) for p in bad if isinstance(p, list) and len(p) == 2
                   and all(map(_is_int, p)) and 0 <= p[0] < n and 0 <= p[1] < n_steps}
    else:
        flagged = {bk for bk, e in error.items() if e > tol}
    pts = rec.get("points")
    points = tuple(_points(pts if not isinstance(pts, list) else pts[b] if b < len(pts) else None)
                   for b in range(n))
    return Convergence(f"{tol * 100:g}% of |f(x) - f(baseline)|", True, frozenset(flagged), error,
                       points)


def _from_delta(out: AttributionTensors) -> Convergence | None:
    """No record: flag |delta| > 5% of |attributed step score|."""
    name = out.meta.get("target_fn", "")
    score = out.step_scores.get(name)
    if score is None or out.delta is None:
        return None
    ratio = out.delta.abs() / score.abs()
    flagged = (out.delta.abs() > TOLERANCE * score.abs()) & out.step_mask
    args = method_args(out)
    points = str(args["n_steps"]) if _is_int(args.get("n_steps")) else ""
    return Convergence(
        f"{TOLERANCE * 100:g}% of |{name}|", False, frozenset(map(tuple, flagged.nonzero().tolist())),
        {(b, k): float(ratio[b, k]) for b, k in out.step_mask.nonzero().tolist()
         if ratio[b, k].isfinite()},
        (points,) * out.source.shape[0])


def convergence(out: AttributionTensors) -> Convergence | None:
    """Which steps of a path method did not converge: from `meta["completeness"]`, else from
    `delta`; None when `out` has neither (the method has no completeness to check)."""
    steps = read_meta(out, "aggregations", [])
    done = {s[0] for s in steps if isinstance(s, list) and s} if isinstance(steps, list) else set()
    rec = read_meta(out, "completeness", None)
    if isinstance(rec, dict) and not done & {"merge", "difference"}:  # its k still index `steps`
        return _from_record(out, rec)
    return _from_delta(out)


def unconverged(conv: Convergence | None, out: AttributionTensors, row: int) -> list[int]:
    """Step indices k of batch row `row` that `conv` flags (real steps only)."""
    if conv is None:
        return []
    return sorted(k for b, k in conv.unconverged if b == row and bool(out.step_mask[row, k]))

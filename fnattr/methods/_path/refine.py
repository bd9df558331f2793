"""Completeness of path methods: the record every result carries, and refinement to a tolerance.

A path method's scores of step t sum to f_t(x) - f_t(baseline) when its integral is exact; the
completeness error `delta` measures how far the quadrature is from that. Every path method
records, in `meta["completeness"]` (JSON), the tolerance, each step's relative error
|delta| / |f(x) - f(baseline)|, the steps above the tolerance and the points each step used.
With `n_steps="auto"` the method doubles its points, per step, until the step meets the
tolerance or the cap (`refine`).
"""

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fnattr.engine import causal_target_mask
from fnattr.attribution import Context
from fnattr.progress import Reporter
from fnattr.result import AttributionTensors

AUTO_START = 8  # points of the first level of n_steps="auto"
TOLERANCE = 0.05  # the default: |delta| <= 5% of |f(x) - f(baseline)|
# Nested levels add only their new points to the last level's sums; False recomputes each
# level whole at the same points (benchmarks/bench_equal_accuracy.py compares the two).
REUSE_POINTS = True


class ConvergenceWarning(UserWarning):
    """Some steps of a path method missed the completeness tolerance."""


def check_options(n_steps: int | str, tolerance: float, max_steps: int, *,
                  start: int = AUTO_START, name: str = "max_steps") -> None:
    """Friendly errors for the convergence options, before any work (`name`: the argument
    that caps the refinement; `start`: its first level)."""
    if isinstance(n_steps, str) and n_steps != "auto":
        raise ValueError(f"`n_steps`={n_steps!r}: pass a number of points or 'auto'.")
    if not isinstance(n_steps, str) and n_steps < 1:
        raise ValueError(f"`n_steps`={n_steps}: it must be at least 1 (or 'auto').")
    if not 0 < tolerance < 1:
        raise ValueError(f"`tolerance`={tolerance}: use a fraction in (0, 1), e.g. 0.05 for 5%.")
    if max_steps < start:
        raise ValueError(f"`{name}`={max_steps}: it must be at least {start}.")


def step_sums(ctx: Context, attrs: Sequence[Tensor | None], rows: Tensor | None = None) -> Tensor:
    """Sum of each step's scores `[rows, step]` over visible source and target positions
    (`rows`: the batch row of each row of `attrs`, default every row in order)."""
    batch, total = ctx.batch, 0
    rows = slice(None) if rows is None else rows
    for side, attr in zip(("source", "target"), attrs):
        if attr is None:
            continue
        flat = attr.flatten(3).sum(-1) if attr.ndim > 3 else attr
        if side == "source":
            mask = batch.source_mask[rows][:, None, :].expand_as(flat)
        else:
            mask = causal_target_mask(batch, ctx.steps)[rows]
        total = total + (flat * mask).sum(-1)
    return total * batch.target_mask[rows][:, ctx.steps]


def allowed_error(expected: Tensor, f_x: Tensor, f_base: Tensor, tolerance: float) -> Tensor:
    """The largest |delta| each step may have: tolerance * |f(x) - f(baseline)|, and a float
    rounding floor so that a step whose ends agree is not chased forever."""
    floor = 100 * torch.finfo(expected.dtype).eps * (f_x.abs() + f_base.abs() + 1)
    return tolerance * expected.abs() + floor


def record(ctx: Context, delta: Tensor, expected: Tensor, f_x: Tensor, f_base: Tensor,
           tolerance: float, points: Tensor | int | None, rule: str | None = None) -> dict[str, str]:
    """`meta["completeness"]`: tolerance, relative error per step, unconverged steps, points
    (left out for methods without quadrature points, such as DeepLIFT) and the `rule` that
    placed them, where named."""
    real = ctx.batch.target_mask[:, ctx.steps].cpu()
    delta, expected = delta.detach().cpu(), expected.detach().cpu()
    bad = (delta.abs() > allowed_error(expected, f_x.cpu(), f_base.cpu(), tolerance)) & real
    rel = delta.abs() / expected.abs().clamp_min(torch.finfo(expected.dtype).tiny)
    rows = [[float(v) if ok else None for v, ok in zip(r, m)] for r, m in zip(rel.tolist(), real.tolist())]
    info = {"tolerance": tolerance, "relative_error": rows,
            "unconverged": [[int(b), int(k)] for b, k in bad.nonzero().tolist()]}
    if points is not None:
        info["points"] = points if isinstance(points, int) else points.cpu().tolist()
    if rule is not None:
        info["rule"] = rule
    return {"completeness": json.dumps(info)}


def attach(ctx: Context, out: AttributionTensors, f_x: Tensor, f_base: Tensor, *,
           points: int | None = None, tolerance: float = TOLERANCE) -> AttributionTensors:
    """`out` with its `delta` (sum of scores minus f(x) - f(baseline)) and its record."""
    delta = completeness_delta(out, (f_x - f_base).detach().cpu())
    meta = record(ctx, delta, f_x - f_base, f_x, f_base, tolerance, points)
    return out.replace(delta=delta, meta={**out.meta, **meta})


def completeness_delta(out: AttributionTensors, expected: Tensor) -> Tensor:
    """Sum of every score of each step minus `expected` (f(input) - f(baseline)); 0 at padding."""
    total = out.source.flatten(2).sum(-1)
    if out.target is not None:
        total = total + out.target.flatten(2).sum(-1)
    return (total - expected) * out.step_mask


def warn_unconverged(ctx: Context, method: str, meta: dict[str, str], cap: int, *,
                     name: str = "max_steps", also: str = "") -> None:
    """One warning that lists every step above the tolerance (row, step position, token);
    `name` is the argument that raises the cap, `also` another remedy to name."""
    info = json.loads(meta["completeness"])
    if not info["unconverged"]:
        return
    steps = ctx.steps.tolist()
    parts = [f"row {b} step {steps[k]} {ctx.batch.target_tokens[b][steps[k]]!r} "
             f"({100 * info['relative_error'][b][k]:.2g}%)" for b, k in info["unconverged"][:20]]
    more = len(info["unconverged"]) - len(parts)
    warnings.warn(
        f"{method}: {len(info['unconverged'])} step(s) missed |delta| <= {100 * info['tolerance']:g}% of "
        f"|f(x) - f(baseline)| with up to {cap} points: {', '.join(parts)}"
        f"{f' and {more} more' if more > 0 else ''}. Raise `{name}`{also}, or read them with care "
        "(listed in meta['completeness']).", ConvergenceWarning, stacklevel=3)


# for IG and layer IG with a fixed rule: the remedy that met the tolerance on more steps for
# less work on SmolLM2 (docs/benchmarks.md, "IG at equal accuracy")
TRY_ADAPTIVE = (", try method='adaptive' (its points go where a step's integrand is sharp, which "
                "a fixed spacing misses)")


# compute(sub_ctx, n_points, rows) -> (results, attrs): per side, tensors [batch, sub_steps, ...]
# at the rows `rows` (others zero): `results` are returned, `attrs` sum to f(x) - f(baseline).
# A LevelFn reports its forwards on the progress reporter it was built with. One that `refine`
# may nest also takes `part=(alphas, weights)`: the sum over those points only.
LevelFn = Callable[..., tuple[list[Tensor | None], list[Tensor | None]]]
# nest(n) -> (m, scale, alphas, weights) or None: the next level, as `_paths.next_level`
NestFn = Callable[[int], tuple[int, float, Tensor, Tensor] | None]


def _merged(totals: list[Tensor | None], got: list[Tensor | None], cols: Tensor,
            take: Tensor) -> None:
    """Write `got` [batch, len(cols), ...] into `totals` [batch, step, ...] where `take`."""
    for total, g in zip(totals, got):
        if g is not None:
            sel = take[(..., *(None,) * (g.ndim - 2))]
            total[:, cols] = torch.where(sel, g, total[:, cols])


def refine(ctx: Context, compute: LevelFn, expected: Tensor, f_x: Tensor, f_base: Tensor, *,
           tolerance: float, max_steps: int, reporter: Reporter, start: int = AUTO_START,
           unit: str = "points", nest: NestFn | None = None,
           ) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """Double the points (`start`, 2 `start`, ... up to `max_steps`) for the steps still above
    the tolerance; `reporter` shows the level ("16 points", `unit` naming them) and `compute`
    counts its own work on it.

    Each level recomputes only the rows and steps that have not converged. Gauss-Legendre
    points are not nested, so nothing is reused (the total cost is below twice that of the
    final level). Where `nest` gives a next level that keeps the last one's points (the Riemann
    rules but the midpoint one, `_paths.next_level`), only the new points are computed and the
    level is the last one's sums, scaled, plus theirs: the total cost is that of the final
    level. Returns the results per side, `delta` [batch step] and the points each step used
    [batch step]."""
    n_rows, n_steps = expected.shape
    real = ctx.batch.target_mask[:, ctx.steps]
    bar = allowed_error(expected, f_x, f_base, tolerance)
    todo = real.clone()
    results: list[Tensor | None] | None = None
    sums: list[Tensor | None] | None = None  # the attrs of each step's last level, where nested
    delta = torch.zeros_like(expected)
    points = torch.zeros(n_rows, n_steps, dtype=torch.long, device=expected.device)
    n, part = start, None
    while todo.any():
        cols = todo.any(0).nonzero().squeeze(1)
        rows = todo.any(1).nonzero().squeeze(1).tolist()
        sub = dataclasses.replace(ctx, steps=ctx.steps[cols])
        reporter.update(detail=f"{n} {unit}")
        if part is None or not REUSE_POINTS:
            got, attrs = compute(sub, n, rows)
        else:  # the last level at these steps, scaled, plus the new points
            scale, new = part[1], compute(sub, n, rows, part=part[2:])
            got, attrs = ([None if g is None else scale * t[:, cols] + g for t, g in zip(totals, fresh)]
                          for totals, fresh in zip((results, sums), new))
        take = todo[:, cols]
        if results is None:
            results = [None if g is None else g.new_zeros(n_rows, n_steps, *g.shape[2:]) for g in got]
            if nest is not None and nest(start) is not None:
                sums = [None if g is None else g.new_zeros(n_rows, n_steps, *g.shape[2:]) for g in attrs]
        _merged(results, got, cols, take)
        if sums is not None:
            _merged(sums, attrs, cols, take)
        d = step_sums(sub, attrs) - expected[:, cols]
        delta[:, cols] = torch.where(take, d, delta[:, cols])
        points[:, cols] = torch.where(take, n, points[:, cols])
        todo[:, cols] = take & (d.abs() > bar[:, cols])
        part = None if nest is None else nest(n)
        following = 2 * n if part is None else part[0]
        if following > max_steps:
            break
        n = following
    return results, delta * real, points

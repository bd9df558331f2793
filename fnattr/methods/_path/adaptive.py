"""Integrated gradients on a mesh refined, per step, where the path's completeness fails.

Along the straight path gamma(a) = baseline + a (x - baseline), step k's score f(a) has the
derivative g(a) = sum_i grad_i f(gamma(a)) . (x_i - baseline_i): the sum of the scores that the
gradient at a gives. A node a (one forward and one batched backward, for the rows and steps that
need it) gives both, so each interval [a, c] of a step's mesh knows its own completeness error:
r = (c - a) / 2 (g(a) + g(c)) - (f(c) - f(a)) for the trapezoid rule, and the errors of a step's
intervals sum to its delta. The first interval [0, c] takes its midpoint instead (r = c g(c/2) -
(f(c) - f(0)), f(0) being f(baseline)), so no gradient is ever taken at the baseline itself,
where a bias-free model (Llama) fed the zero vector has gradients of about (1/sqrt(eps))^layers.
Halving it makes that midpoint a breakpoint and takes the new midpoint: every node a step
computes stays in its mesh.

A step starts with `START` equal intervals (`START` + 1 nodes). While its |delta| or one
interval's |r| is above the tolerance, the intervals whose |r| is at least `SPLIT` times the
largest are halved; each round computes every row's and step's new nodes in one batch (grouped
by the steps that need them), up to `max_steps` nodes per step. So the points go where the
integrand is sharp: on SmolLM2 with the UNK baseline a step's score jumps within 1/256 of the
path, which 128 Gauss-Legendre points miss (`benchmarks/bench_equal_accuracy.py`).

Each node's gradients are kept until its step is done, as halving an interval changes the
weights of its ends; a step's sum is taken and its nodes freed as soon as it meets the tolerance
or its cap. Memory grows with the points of the steps still refining, about (their nodes) x one
step's gradients, on top of the result.

The path's inputs are a `Node` function's business: IG moves the embeddings (`ig_node`), layer
IG a layer's outputs (`fnattr.methods.layer`); both give per-step gradients per side, and the
fixed rules sum the same nodes (`integrated_gradients.path_sums`).
"""

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from fnattr.methods import _triangular

from fnattr.methods._path import refine as _converge
from fnattr.attribution import Context
from fnattr.progress import Reporter
from fnattr.types import TargetFn

START = 8  # intervals of the first mesh
SPLIT = 0.5  # halve the intervals whose |r| is at least this fraction of the step's largest
NARROWEST = 2.0 ** -40  # an interval this narrow is not halved again

# (ctx with the steps wanted, alpha [copies], batch rows [copies]) -> the copies' scores
# [copies step] and their gradients per side (source, target; None where a side does not move)
Node = Callable[[Context, Tensor, Tensor], tuple[Tensor, list[Tensor | None]]]


def ig_node(target_fn: TargetFn, x, base) -> Node:
    """IG's nodes: gradients w.r.t. the embeddings at `base + alpha (x - base)`."""

    def node(sub: Context, alpha: Tensor, rows: Tensor):
        got = _triangular.along_path(sub, target_fn, x, base, alpha[:, None, None], rows)
        return got.scores, [*got.grads, None][:2]

    return node


@dataclasses.dataclass(frozen=True)
class _Node:
    """One row's and step's score `f`, its derivative along the path `g`, and its gradient per
    side `[pos, d]` (None for a side that is not attributed) at one point of the path."""

    f: float
    g: float
    grads: tuple[Tensor | None, ...]


def _evaluate(ctx: Context, node: Node, diffs: list[Tensor | None],
              wanted: dict[tuple[int, float], set[int]], chunk: int,
              bar: Reporter) -> dict[tuple[int, int, float], _Node]:
    """The nodes `wanted` ((row, alpha) -> step indexes), in chunks of at most `chunk` copies of
    the rows that need the same steps; `diffs` = x - baseline per side."""
    groups: dict[tuple[int, ...], list[tuple[int, float]]] = defaultdict(list)
    for (b, a), ks in wanted.items():
        groups[tuple(sorted(ks))].append((b, a))
    lengths = (ctx.batch.source_mask.sum(1) + ctx.batch.target_mask.sum(1)).tolist()
    like = next(d for d in diffs if d is not None)
    out = {}
    bar.expect(len(wanted))
    for ks, pairs in groups.items():
        sub = dataclasses.replace(ctx, steps=ctx.steps[list(ks)])
        pairs.sort(key=lambda p: (lengths[p[0]], p))  # rows of like length share a chunk
        for lo in range(0, len(pairs), chunk):
            part = pairs[lo:lo + chunk]
            rows = torch.tensor([b for b, _ in part], device=like.device)
            alpha = torch.tensor([a for _, a in part], dtype=like.dtype, device=like.device)
            scores, sides = node(sub, alpha, rows)
            f = scores.detach().double().cpu()
            # g = d f / d alpha: the node's scores summed over the positions the step sees
            attrs = [None if g is None else g * d[rows][:, None] for g, d in zip(sides, diffs)]
            g = _converge.step_sums(sub, attrs, rows).detach().double().cpu()
            for i, (b, a) in enumerate(part):
                for j, k in enumerate(ks):
                    out[b, k, a] = _Node(float(f[i, j]), float(g[i, j]),
                                         # copies, so that a step's nodes free on its own
                                         tuple(None if s is None else s[i, j].clone() for s in sides))
            bar.advance(len(part))
    return out


def _residuals(mesh: list[float], nodes, b: int, k: int, f_base: float) -> list[float]:
    """Each interval's completeness error (see the module docstring); `mesh` its breakpoints."""
    first = nodes[b, k, mesh[1] / 2]
    out = [mesh[1] * first.g - (nodes[b, k, mesh[1]].f - f_base)]
    for a, c in zip(mesh[1:], mesh[2:]):
        na, nc = nodes[b, k, a], nodes[b, k, c]
        out.append((c - a) / 2 * (na.g + nc.g) - (nc.f - na.f))
    return out


def weights(mesh: list[float]) -> dict[float, float]:
    """The rule on breakpoints `mesh` (0 first, 1 last): the first interval's midpoint, the
    trapezoid on the others."""
    out = defaultdict(float)
    out[mesh[1] / 2] += mesh[1]
    for a, c in zip(mesh[1:], mesh[2:]):
        out[a] += (c - a) / 2
        out[c] += (c - a) / 2
    return dict(out)


def integrate(ctx: Context, node: Node, diffs: list[Tensor | None], expected: Tensor,
              f_base: Tensor, bar: Tensor, *, max_steps: int, chunk: int,
              reporter: Reporter) -> tuple[list[Tensor | None], Tensor]:
    """Gradients integrated on each step's refined mesh, per side `[batch, step, ...]` (zero at
    padding steps; None for a side whose `diffs`, x - baseline, is None), and the nodes each
    step used `[batch step]`. `expected` = f(x) - f(baseline) and `bar`, the largest |delta| a
    step may keep, are `[batch step]`."""
    real = ctx.batch.target_mask[:, ctx.steps].cpu()
    expected, f_base, bar = (t.detach().double().cpu() for t in (expected, f_base, bar))
    first = [i / START for i in range(START + 1)]
    mesh = {(b, k): list(first) for b, k in real.nonzero().tolist()}
    wanted: dict[tuple[int, float], set[int]] = defaultdict(set)
    for b, k in mesh:
        for a in [first[1] / 2, *first[1:]]:
            wanted[b, a].add(k)
    done = _Done(real, diffs)
    nodes: dict[tuple[int, int, float], _Node] = {}
    todo, level = set(mesh), 0
    while wanted:
        reporter.update(detail=f"round {level}, {len(todo)} steps refining, "
                               f"{max(len(mesh[s]) for s in todo)} points at most")
        nodes.update(_evaluate(ctx, node, diffs, wanted, chunk, reporter))
        wanted, level = defaultdict(set), level + 1
        for b, k in sorted(todo):
            m = mesh[b, k]
            r = _residuals(m, nodes, b, k, float(f_base[b, k]))
            worst = max(abs(v) for v in r)
            total = sum(w * nodes[b, k, a].g for a, w in weights(m).items())  # delta + expected
            room = max_steps - len(m)  # a step with n breakpoints (0 included) has n nodes
            split = sorted((i for i, v in enumerate(r) if abs(v) >= SPLIT * worst
                            and m[i + 1] - m[i] > NARROWEST), key=lambda i: -abs(r[i]))[:room]
            if max(abs(total - float(expected[b, k])), worst) <= float(bar[b, k]) or not split:
                todo.discard((b, k))
                done.add(b, k, m, nodes)  # its mesh is final: its nodes' memory goes now
                continue
            new = [(m[i] + m[i + 1]) / 2 for i in split]
            for i in split:  # halving [0, c] makes c/2 a breakpoint and needs c/4
                wanted[b, m[1] / 4 if i == 0 else (m[i] + m[i + 1]) / 2].add(k)
            mesh[b, k] = sorted(m + new)
    return done.sides, done.points


class _Done:
    """Each finished step's weighted sum of its nodes' gradients, per side `[batch, step, ...]`
    (None for a side whose `diffs` is None), and its node counts `[batch step]`."""

    def __init__(self, real: Tensor, diffs: list[Tensor | None]):
        n_rows, n_steps = real.shape
        self.sides = [None if t is None else torch.zeros(n_rows, n_steps, *t.shape[1:], dtype=t.dtype,
                                                         device=t.device) for t in diffs]
        self.points = torch.zeros(n_rows, n_steps, dtype=torch.long)

    def add(self, b: int, k: int, mesh: list[float], nodes: dict) -> None:
        """Step k of row b on its final `mesh`: summed here, its nodes dropped from `nodes`."""
        rule = weights(mesh)
        self.points[b, k] = len(rule)
        for s, total in enumerate(self.sides):
            if total is not None:
                total[b, k] = sum(w * nodes[b, k, a].grads[s] for a, w in rule.items())
        for a in rule:
            del nodes[b, k, a]

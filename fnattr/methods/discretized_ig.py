"""Discretized integrated gradients: monotonic paths through real vocabulary embeddings."""

import json
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr.batch import Batch
from fnattr.methods import _buckets, _triangular
from fnattr.methods._path import refine as _converge
from fnattr.methods._path import quadrature as _paths
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, finish, logit_step_scores, run_scored,
)
from fnattr.methods.integrated_gradients import Baseline, baselines, integrate
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

Strategy = Literal["greedy", "maxcount"]


def vocabulary(ctx: Context, side: str) -> Float[Tensor, "vocab d"]:
    """Every token's embedding as the model computes it on `side` (scaled embeddings included)."""
    module = ctx.handle.modules[side]
    n = getattr(module, "num_embeddings", None) or module.weight.shape[0]
    with torch.no_grad():
        return ctx.handle.embed(torch.arange(n, device=ctx.embedded.source.device)[None], side)[0]


def monotonize(
    a: Float[Tensor, "*#pos d"], base: Float[Tensor, "*#pos d"], w: Float[Tensor, "*#pos d"], m: int,
) -> tuple[Float[Tensor, "*#pos d"], Bool[Tensor, "*#pos d"]]:
    """The paper's Monotonize step for an anchor `a` between the baseline w' = `base` and `w`.

    M_a = {j | w'_j <= a_j <= w_j} u {j | w'_j >= a_j >= w_j} (the monotonic dimensions),
    c[M_a] = a[M_a] and c[not M_a] = w[not M_a] - (1/m) (w[not M_a] - w'[not M_a]).
    Returns (c, M_a as a mask)."""
    mono = (a >= torch.minimum(base, w)) & (a <= torch.maximum(base, w))
    return torch.where(mono, a, w - (1.0 / m) * (w - base)), mono


def _rows_equal(vocab: Tensor, base: Tensor) -> Tensor:
    """[pos vocab]: which vocabulary rows equal each position's baseline exactly."""
    uniq, inverse = torch.unique(base, dim=0, return_inverse=True)
    return torch.stack([(vocab == u).all(-1) for u in uniq])[inverse]


def monotonic_paths(
    x: Float[Tensor, "pos d"], base: Float[Tensor, "pos d"], ids: Int[Tensor, " pos"],
    vocab: Float[Tensor, "vocab d"], *, n_steps: int, n_neighbors: int, strategy: Strategy,
) -> tuple[Float[Tensor, "pos point d"], Int[Tensor, "pos anchor"]]:
    """DIG paths w' = x^0, x^1, ..., x^(m+1) = w (m = `n_steps`) and their anchors [pos m].

    Sanyal & Ren 2021, Sec. 2 (interpolation algorithm), as their code `monotonic_paths.py` runs
    it, built from the input word w backwards, for m steps:
    1. AnchorSearch: the candidates are KNN_V(a), the `n_neighbors` vocabulary words nearest
       (Euclidean) to the previous anchor word a (at first a = w), less the baseline word and
       every word already on the path (w and earlier anchors). GREEDY picks the candidate closest
       to its own monotonized copy, ||a' - Monotonize(a')||; MAXCOUNT the one with most monotonic
       dimensions |M_a'|; both with the box between w' and the previous anchor a, ties to the
       nearer neighbour. No candidate left: the anchor is the baseline word from then on (the
       authors' fallback), so the path jumps to w' and stays there.
    2. Monotonize the chosen anchor against the previous path point c (at first c = w): the
       next point is c' = Monotonize(anchor) within the box between w' and c (see
       `monotonize`, step 1/m), so every dimension moves from w towards w', never back.
    The kNN is one `torch.cdist` per step, of the current anchors against the vocabulary. An
    anchor -1 means the baseline.
    """
    if strategy not in ("greedy", "maxcount"):
        raise ValueError(f"`strategy`={strategy!r}: use 'greedy' or 'maxcount'.")
    rows, inf = torch.arange(x.shape[0], device=x.device), float("inf")
    k = max(1, min(n_neighbors, vocab.shape[0] - 1))
    banned = _rows_equal(vocab, base)  # the baseline word is no anchor (unless forced)
    banned[rows, ids] = True  # nor any word already on the path
    word, word_id, point = x, ids, x
    points, anchors = [x], []
    for _ in range(n_steps):
        dist = torch.cdist(word, vocab)
        dist[rows, word_id.clamp(min=0)] = inf  # a word is not its own neighbour
        near = dist.topk(k, largest=False).indices  # [pos k], nearest first
        cand = vocab[near]
        moved, mono = monotonize(cand, base[:, None], word[:, None], n_steps)
        cost = (moved - cand).norm(dim=-1) if strategy == "greedy" else -mono.sum(-1).to(x.dtype)
        ok = ~banned.gather(1, near) & (word_id >= 0)[:, None]
        pick = near[rows, cost.masked_fill(~ok, inf).argmin(-1)]  # argmin: first = nearest tie
        found = ok.any(-1)
        banned[rows[found], pick[found]] = True
        word_id = torch.where(found, pick, -1)
        word = torch.where(found[:, None], vocab[pick], base)
        point = torch.where(found[:, None], monotonize(vocab[pick], base, point, n_steps)[0], base)
        points.append(point)
        anchors.append(word_id)
    points.append(base)
    return torch.stack(points[::-1], 1), torch.stack(anchors[::-1], 1)


def _side_paths(ctx, side, x, base, keep, n_steps, n_neighbors, strategy):
    """Paths [batch pos point d] for one side; positions not in `keep` stay at x."""
    ids = getattr(ctx.batch, f"{side}_ids")
    paths = x[:, :, None].expand(-1, -1, n_steps + 2, -1).clone()
    if keep.any():
        got, _ = monotonic_paths(x[keep], base[keep], ids[keep], vocabulary(ctx, side), n_steps=n_steps,
                                 n_neighbors=n_neighbors, strategy=strategy)
        paths[keep] = got
    return paths


def _dig_grads(ctx, target_fn, paths, method, per_segment, chunk, rows=None, *, bar: Reporter):
    """sum_k sum_j w_j grad f_step(p_k + a_j (p_k+1 - p_k)) * (p_k+1 - p_k): rule `method` with
    `per_segment` points (a_j, w_j) on each linear segment, chunked over (segment, point, row),
    rows of like length together (`_buckets`)
    (`rows`: the batch rows to integrate, default all; the others stay zero); forwards counted
    on `bar`."""
    sides = [0, 1] if ctx.attribute_target else [0]
    n_rows, n_seg = len(ctx.batch), paths[0].shape[2] - 1
    alphas, weights = (t.to(paths[0]) for t in _paths.quadrature(method, per_segment))
    acc = [torch.zeros(n_rows, len(ctx.steps), *paths[i].shape[1:2], paths[i].shape[-1],
                       dtype=paths[i].dtype, device=paths[i].device) for i in sides]
    rows = range(n_rows) if rows is None else rows
    bar.expect(n_seg * per_segment * len(rows))
    for pairs in _buckets.chunks(ctx.batch, list(rows), n_seg * per_segment, chunk):
        c, rows = (torch.tensor(v, device=paths[0].device) for v in zip(*pairs))
        k, j = c // per_segment, c % per_segment  # copy c: point j of segment k
        segs = [p[rows, :, k + 1] - p[rows, :, k] for p in paths]  # [m pos d]
        at = [(p[rows, :, k] + alphas[j][:, None, None] * sg).requires_grad_(i in sides)
              for i, (p, sg) in enumerate(zip(paths, segs))]
        grads = _triangular.gradients(ctx, target_fn, at[0], at[1], [at[i] for i in sides],
                                      rows).grads  # this chunk's graph dies here
        for total, g, i in zip(acc, grads, sides):
            total.index_add_(0, rows, g * (segs[i] * weights[j][:, None, None])[:, None])
        bar.advance(len(rows))
    return acc


def _level(ctx: Context, target_fn: TargetFn, paths, method: str, chunk: int, *,
           bar: Reporter) -> _converge.LevelFn:
    """DIG with n points per segment at some rows and steps; its scores already carry the
    segment (p_k+1 - p_k), so results and attributions are the same tensors."""

    def compute(sub: Context, n: int, rows: list[int]):
        grads = _dig_grads(sub, target_fn, paths, method, n, chunk, rows, bar=bar)
        got = [grads[0], grads[1] if sub.attribute_target else None]
        return got, got

    return compute


def _per_path(record: dict[str, str], n_segments: int) -> dict[str, str]:
    """`record` with its points per segment turned into points per path (forwards per step)."""
    info = json.loads(record["completeness"])
    pts = info["points"]
    info["points"] = (pts * n_segments if isinstance(pts, int)
                      else [[p * n_segments for p in row] for row in pts])
    return {"completeness": json.dumps(info)}


@attribution_method(family="gradients", reduction="sum")
def discretized_integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int = 32, strategy: Strategy = "greedy", n_neighbors: int = 64,
    points_per_segment: int | Literal["auto"] = "auto", tolerance: float = _converge.TOLERANCE,
    max_points_per_segment: int = 16, internal_batch_size: int = 64, baseline: Baseline = "auto",
    method: str = "riemann_left",
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Discretized integrated gradients (Sanyal & Ren 2021, arXiv:2108.13654, Sec. 2).

    Each ordinary token moves from its baseline w' to its embedding w along a path
    w' = x^0, ..., x^(m+1) = w whose m = `n_steps` inner points x^k are anchored on vocabulary
    words (`monotonic_paths`: AnchorSearch among the `n_neighbors` nearest words, `strategy`
    "greedy" or "maxcount", then Monotonize). The path is monotonic in every dimension i
    (x'_i <= x^j_i <= x^k_i <= x_i for j <= k, or >= throughout), so the path integral
    DIG_i(x) = int_{x^k_i = x'_i}^{x_i} dF(x^k)/dx_i dx^k_i is approximated by the paper's
    Riemann sum DIG_i(x) ~ sum_k dF(x^k)/dx_i (x^(k+1)_i - x^k_i), the gradients taken at the
    path points. `n_steps` is the paper's m (the authors' `steps`), so there are m + 1 segments.
    `method="riemann_left"` with `points_per_segment=1` is that sum; `points_per_segment=2**f`
    is the authors' up-sampling `factor=f` (f midpoint insertions), and `delta` shrinks as
    1/`points_per_segment`. `method="gausslegendre"` puts Gauss-Legendre points on each segment
    instead, off the words but with `delta` near 0 in a few points. Cost:
    (`n_steps` + 1) * `points_per_segment` forwards per sequence. Special tokens keep their
    embedding; the baseline goes through `baselines` as in `integrated_gradients`.

    Against inseq 0.7.1's DIG (a port of the authors' code): inseq reads its `n_steps` N as the
    number of path points, so it builds N - 2 anchors but Monotonizes by 1/N, where the authors'
    code (INK-USC/DIG, `steps` = m) builds m anchors and Monotonizes by 1/m, as here; inseq also
    searches 50 neighbours (the authors 500, here `n_neighbors`=64), keeps every special token
    of the model (the authors [CLS]/[SEP]), starts from the UNK token (here
    `baseline="unk"`) and casts the paths to float32. So
    `n_steps=N - 2, n_neighbors=50, baseline="unk", points_per_segment=1` has inseq's point
    count, candidate words and Riemann sum; the two differ only through Monotonize's step,
    1/(N - 2) here and 1/N there, which moves the non-monotonic dimensions and enters GREEDY's
    cost. See docs/inseq-differences.md.

    With `points_per_segment="auto"` (the default) the paths are built once, with `n_steps`
    anchors, and each step gets 1, 2, 4, ... points per segment (up to `max_points_per_segment`)
    until |delta| is at most `tolerance` times |f(x) - f(baseline)|; steps that miss it are named
    in one `ConvergenceWarning`. A level reruns only the sequences with a step still above the
    tolerance (under twice the cost of the last level). `meta["completeness"]` records the
    tolerance, each step's relative error, the unconverged steps and, as "points", the points
    per path each step's result used: (`n_steps` + 1) * its points per segment.
    `progress=True` shows the points per segment and the forwards done on stderr.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]); `delta`
    [batch step]: sum of scores minus (f(input) - f(baseline)).

    >>> out = discretized_integrated_gradients(model, batch, n_steps=30, strategy="maxcount")
    """
    if points_per_segment != "auto" and (isinstance(points_per_segment, str) or points_per_segment < 1):
        raise ValueError(f"`points_per_segment`={points_per_segment!r}: pass a number >= 1 or 'auto'.")
    if n_steps < 1 or internal_batch_size < 1:
        raise ValueError(f"`n_steps`={n_steps}, `internal_batch_size`={internal_batch_size}: "
                         "use values >= 1.")
    _converge.check_options(points_per_segment, tolerance, max_points_per_segment, start=1,
                            name="max_points_per_segment")
    if strategy not in ("greedy", "maxcount"):
        raise ValueError(f"`strategy`={strategy!r}: use 'greedy' or 'maxcount'.")
    auto = points_per_segment == "auto"
    _paths.quadrature(method, 1 if auto else points_per_segment)  # an unknown `method`: raises
    args = call_args(discretized_integrated_gradients, locals())
    with (report(progress, "discretized_integrated_gradients", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        b = ctx.batch
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, baseline, "discretized_integrated_gradients")
        keep_src = b.source_mask & ~b.source_special & (x[0] != base[0]).any(-1)
        keep_tgt = (b.target_mask & ~b.target_special & (x[1] != base[1]).any(-1)
                    & ctx.attribute_target)
        bar.update(detail=f"building paths of {n_steps} anchors")
        paths = [_side_paths(ctx, "source", x[0], base[0], keep_src, n_steps, n_neighbors, strategy),
                 _side_paths(ctx, "target", x[1], base[1], keep_tgt, n_steps, n_neighbors, strategy)]
        with torch.no_grad():
            ends = [run_scored(ctx, target_fn, s, t)
                    for s, t in (x, (paths[0][:, :, 0], paths[1][:, :, 0]))]
        compute = _level(ctx, target_fn, paths, method, internal_batch_size, bar=bar)
        attr, delta, record = integrate(ctx, compute, (ends[0][1], ends[1][1]),
                                        n_steps=points_per_segment, tolerance=tolerance,
                                        max_steps=max_points_per_segment, bar=bar, start=1,
                                        unit="points per segment")
        record = _per_path(record, n_steps + 1)
        out = finish(ctx, method="discretized_integrated_gradients", args=args, target_fn=target_fn,
                     source=attr[0], target=attr[1],
                     step_scores=logit_step_scores(ctx, ends[0][0].logits, target_fn, step_scores))
        if auto:
            _converge.warn_unconverged(ctx, "discretized_integrated_gradients", record,
                                       (n_steps + 1) * max_points_per_segment,
                                       name="max_points_per_segment")
        return out.replace(delta=delta.cpu(), meta={**out.meta, **record})

"""GradientSHAP (expected gradients with input noise) over every generated step."""

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.methods import _buckets, _triangular
from fnattr.methods._path import refine as _converge
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, clean_logits, finish, logit_step_scores, run_scored,
)
from fnattr.methods.integrated_gradients import Baseline, baselines
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


@dataclasses.dataclass(frozen=True)
class Draws:
    """Random draws of every (sample, row): path point, baseline index, input noise."""

    alpha: Tensor        # [sample batch]
    which: Tensor        # [sample batch] index into the baselines
    source: Tensor       # [sample batch src d] noise (0 at padding and special tokens)
    target: Tensor       # [sample batch tgt d]


def row_generator(seed: int, batch: Batch, row: int) -> torch.Generator:
    """A generator seeded by `seed` and the row's real tokens: a row draws the same numbers
    whatever batch it is in."""
    ids = [batch.source_ids[row][batch.source_mask[row]].tolist(),
           batch.target_ids[row][batch.target_mask[row]].tolist()]
    digest = hashlib.sha256(f"{seed}|{ids}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _noise(gen, n, ids_mask, special, d, stdevs, dtype):
    out = torch.zeros(n, len(ids_mask), d, dtype=dtype)
    where = ids_mask & ~special
    if stdevs > 0:
        out[:, where.cpu()] = torch.randn(n, int(where.sum()), d, generator=gen, dtype=dtype) * stdevs
    return out


def draws(ctx: Context, n_samples: int, n_baselines: int, stdevs: float, seed: int,
          generator: torch.Generator | None) -> Draws:
    """All draws, row by row: from `generator` in order, or from `row_generator(seed, ...)`."""
    b, emb = ctx.batch, ctx.embedded
    d, dtype = emb.source.shape[-1], emb.source.dtype
    rows = []
    for r in range(len(b)):
        gen = generator if generator is not None else row_generator(seed, b, r)
        alpha = torch.rand(n_samples, generator=gen, dtype=dtype)
        which = torch.randint(n_baselines, (n_samples,), generator=gen)
        src = _noise(gen, n_samples, b.source_mask[r], b.source_special[r], d, stdevs, dtype)
        tgt = (_noise(gen, n_samples, b.target_mask[r], b.target_special[r], d, stdevs, dtype)
               if ctx.attribute_target else torch.zeros(n_samples, b.target_ids.shape[1], d, dtype=dtype))
        rows.append((alpha, which, src, tgt))
    dev = emb.source.device
    return Draws(*(torch.stack(parts, 1).to(dev) for parts in zip(*rows)))


def _grads(ctx, target_fn, x, bases, dr: Draws, n_samples, chunk, bar: Reporter, times: bool = True):
    """mean_s grad f_step(b_s + a_s (x + e_s - b_s)) * (x + e_s - b_s) (without the factor when
    not `times`), chunked over rows of like length (`_buckets`); the forwards (one per sample
    and row) counted on `bar`."""
    n_rows = len(ctx.batch)
    sides = [0, 1] if ctx.attribute_target else [0]
    acc = [torch.zeros(n_rows, len(ctx.steps), *x[i].shape[1:], dtype=x[i].dtype, device=x[i].device)
           for i in sides]
    noise = (dr.source, dr.target)
    bar.expect(n_samples * n_rows)
    for pairs in _buckets.chunks(ctx.batch, list(range(n_rows)), n_samples, chunk):
        s_idx, rows = (torch.tensor(v, device=x[0].device) for v in zip(*pairs))
        which, alpha = dr.which[s_idx, rows], dr.alpha[s_idx, rows][:, None, None]
        base = [torch.stack([bases[k][i][r] for k, r in zip(which.tolist(), rows.tolist())])
                for i in (0, 1)]
        diff = [x[i][rows] + noise[i][s_idx, rows] - base[i] for i in (0, 1)]
        point = [(base[i] + alpha * diff[i]).requires_grad_(i in sides) for i in (0, 1)]
        tgt = point[1] if ctx.attribute_target else x[1][rows]
        grads = _triangular.gradients(ctx, target_fn, point[0], tgt, [point[i] for i in sides],
                                      rows).grads  # this chunk's graph dies here
        for total, g, i in zip(acc, grads, sides):
            total.index_add_(0, rows, (g * diff[i][:, None] if times else g) / n_samples)
        bar.advance(len(rows))
    return acc


def _expected(ctx, target_fn, x, bases, dr: Draws, n_samples, chunk,
              bar: Reporter) -> tuple[Tensor, Tensor]:
    """mean_s f_step(x + e_s) and mean_s f_step(b_s) [batch step] over the draws of `_grads`,
    without a graph: f at each baseline once, f at x + e_s chunked over (sample, row) as in
    `_grads` (one forward at x when there is no noise; those with noise counted on `bar`)."""
    n_rows = len(ctx.batch)
    with torch.no_grad():
        f_bases = torch.stack([run_scored(ctx, target_fn, *b)[1] for b in bases])  # [base batch step]
        f_base = f_bases[dr.which, torch.arange(n_rows, device=dr.which.device)].sum(0) / n_samples
        if not (dr.source.any() or dr.target.any()):
            return run_scored(ctx, target_fn, *x)[1], f_base
        f_x = torch.zeros_like(f_base)
        pairs = [(s, r) for s in range(n_samples) for r in range(n_rows)]
        noise = (dr.source, dr.target)
        bar.expect(len(pairs))
        for lo in range(0, len(pairs), chunk):
            s_idx, rows = (torch.tensor(v, device=x[0].device) for v in zip(*pairs[lo:lo + chunk]))
            point = [x[i][rows] + noise[i][s_idx, rows] for i in (0, 1)]
            f_x.index_add_(0, rows, run_scored(ctx, target_fn, *point, rows)[1] / n_samples)
            bar.advance(len(rows))
    return f_x, f_base


@attribution_method(family="gradients", reduction="sum")
def gradient_shap(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_samples: int = 32, stdevs: float = 0.0,
    baseline: Baseline | Sequence[Baseline] = "auto",
    seed: int = 0, generator: torch.Generator | None = None,
    internal_batch_size: int = 64, multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """GradientSHAP (Lundberg & Lee 2017, arXiv:1705.07874; captum's GradientShap): the mean over
    `n_samples` draws of grad f(b + a (x + e - b)) * (x + e - b), with b drawn uniformly from
    `baseline` (one baseline as in `integrated_gradients`, or a sequence of them), a ~ U[0, 1]
    and Gaussian noise e (standard deviation `stdevs`, on ordinary tokens; none at specials).

    Its expectation is expected gradients, i.e. the mean of IG over the baselines (and the noise).
    Reproducible: the draws of each row come from `seed` and the row's tokens (so a row gets the
    same draws in any batch), or from `generator` (a CPU `torch.Generator`) in row order if one
    is given. The draws are made on the CPU, so a seed gives the same result on any device.

    Completeness holds in expectation only: E[sum of scores] = E_{b, e}[f(x + e) - f(b)]. `delta`
    [batch step] is the sum of a step's scores minus the sample mean of f(x + e_s) - f(b_s) over
    the same `n_samples` draws (extra no-grad forwards at each x + e_s and each baseline): the
    mean, over the draws, of one point's gradient estimate of the path integral from b_s to
    x + e_s minus its exact value. It is a Monte-Carlo quantity (mean 0 over a, given b and e)
    that shrinks like 1/sqrt(`n_samples`), not a quadrature error. `meta["completeness"]`
    records it relative to that sample mean, against the path methods' 5% tolerance, with
    "points" = `n_samples`. `progress=True` shows the forwards done on stderr.

    `multiply_by_inputs=False` (captum's "local" attribution) returns the mean gradient
    mean_s grad f(b_s + a_s (x + e_s - b_s)) itself, without the factor (x + e_s - b_s); it
    has no completeness, so `delta` is None and no record is made.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]) and `delta`
    [batch step].

    >>> out = gradient_shap(model, batch, n_samples=64, baseline=("unk", "zeros"), seed=1)
    """
    if n_samples < 1 or internal_batch_size < 1 or not 0 <= stdevs < math.inf:
        raise ValueError(f"`n_samples`={n_samples}, `internal_batch_size`={internal_batch_size} "
                         f"and `stdevs`={stdevs}: use n_samples, internal_batch_size >= 1, "
                         "a finite stdevs >= 0.")
    specs = list(baseline) if isinstance(baseline, (list, tuple)) else [baseline]
    if not specs:
        raise ValueError("`baseline` is an empty sequence: pass at least one baseline.")
    args = call_args(gradient_shap, locals())
    with (report(progress, "gradient_shap", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        b, x = ctx.batch, (ctx.embedded.source, ctx.embedded.target)
        bases = [baselines(ctx, spec) for spec in specs]
        dr = draws(ctx, n_samples, len(bases), stdevs, seed, generator)
        attr = _grads(ctx, target_fn, x, bases, dr, n_samples, internal_batch_size, bar,
                      times=multiply_by_inputs)
        attr = [attr[0], attr[1] if ctx.attribute_target else None]
        clean = logit_step_scores(ctx, clean_logits(ctx), target_fn, step_scores)
        if not multiply_by_inputs:
            return finish(ctx, method="gradient_shap", args=args, target_fn=target_fn,
                          source=attr[0], target=attr[1], step_scores=clean)
        f_x, f_base = _expected(ctx, target_fn, x, bases, dr, n_samples, internal_batch_size, bar)
        delta = (_converge.step_sums(ctx, attr) - (f_x - f_base)) * b.target_mask[:, ctx.steps]
        record = _converge.record(ctx, delta, f_x - f_base, f_x, f_base, _converge.TOLERANCE,
                                  n_samples)
        out = finish(ctx, method="gradient_shap", args=args, target_fn=target_fn, source=attr[0],
                     target=attr[1], step_scores=clean)
        return out.replace(delta=delta.cpu(), meta={**out.meta, **record})

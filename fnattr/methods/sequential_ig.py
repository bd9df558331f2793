"""Sequential integrated gradients: one token at a time on its path, the others kept as they are.

Completeness is per token: token i's scores of step t sum to E_i = f_t(x) - f_t(x_{i<-b}), f_t at
the input with token i alone at its baseline. `_Terms` holds those per-token terms; `delta` sums
the per-token errors, the record and `n_steps="auto"` judge their absolute values.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.methods import _triangular
from fnattr.methods._path import refine as _converge
from fnattr.methods._path import quadrature as _paths
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, finish, logit_step_scores, run_scored,
)
from fnattr.methods.integrated_gradients import Baseline, baselines, path_quadrature
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _jobs(ctx: Context) -> Tensor:
    """(side, row, position) [job 3] of every token to interpolate: real, non-special, and fed."""
    b = ctx.batch
    sides = [b.source_mask & ~b.source_special]
    if ctx.attribute_target:
        fed = b.target_mask & ~b.target_special
        fed[:, -1] = False  # the last target token is never an input
        sides.append(fed)
    jobs = [(side, r, p) for side, keep in enumerate(sides) for r, p in keep.nonzero().tolist()]
    return torch.tensor(jobs, dtype=torch.long, device=ctx.steps.device).reshape(-1, 3)


def _token(pair: Sequence[Tensor], side: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
    """Each job's token [job d] in `pair` (source, target)."""
    tok = [t[rows, pos.clamp(max=t.shape[1] - 1)] for t in pair]
    return torch.where((side == 0)[:, None], tok[0], tok[1])


def _moved(x: Sequence[Tensor], side: Tensor, rows: Tensor, pos: Tensor,
           value: Tensor) -> list[Tensor]:
    """Rows `rows` of the inputs `x` (source, target), each with its job's token set to `value`."""
    emb = [t[rows].clone() for t in x]
    i = torch.arange(len(rows), device=rows.device)
    for s in (0, 1):
        sel = side == s
        if sel.any():
            emb[s][i[sel], pos[sel]] = value[sel]
    return emb


def _sig_grads(ctx, target_fn, x, base, jobs, alphas, weights, chunk, *, bar: Reporter):
    """For each job's token p: sum_a w_a * grad_p f_step(x, token p at base_p + a (x_p - base_p)),
    per side [batch step pos d]; and f_step at the rule's point a = 0, which is x with token p at
    its baseline ([job step], NaN where the rule has no such point). `bar` counts the forwards,
    one per (token, point)."""
    dev, n_steps = x[0].device, len(ctx.steps)
    acc = [torch.zeros(len(ctx.batch), n_steps, *t.shape[1:], dtype=t.dtype, device=dev) for t in x]
    at_zero = torch.full((len(jobs), n_steps), float("nan"), dtype=x[0].dtype, device=dev)
    work = [(j, a) for j in range(len(jobs)) for a in range(len(alphas))]
    alphas, weights = alphas.to(x[0]), weights.to(x[0])
    bar.expect(len(work))
    for lo in range(0, len(work), chunk):
        j_idx, a_idx = (torch.tensor(v, device=dev) for v in zip(*work[lo:lo + chunk]))
        side, rows, pos = jobs[j_idx].T
        x_tok, b_tok = _token(x, side, rows, pos), _token(base, side, rows, pos)
        leaf = (b_tok + alphas[a_idx][:, None] * (x_tok - b_tok)).requires_grad_()
        scored = _triangular.gradients(ctx, target_fn, *_moved(x, side, rows, pos, leaf), [leaf],
                                       rows)
        (grad,), scores = scored.grads, scored.scores.detach()
        del scored  # this chunk's graph goes before the next forward
        zero = alphas[a_idx] == 0
        at_zero[j_idx[zero]] = scores[zero]
        contrib = grad * weights[a_idx][:, None, None]  # [job step d]
        for s in (0, 1):
            sel = side == s
            if sel.any():
                acc[s].transpose(1, 2).index_put_((rows[sel], pos[sel]), contrib[sel],
                                                  accumulate=True)
        bar.advance(len(j_idx))
    return acc, at_zero


def _token_ends(ctx, target_fn, x, base, jobs, chunk, known: Tensor | None = None, *,
                bar: Reporter) -> Tensor:
    """f_t(x_{i<-b}) [job step]: one forward per token shared by all steps (causal masking), no
    gradient, `chunk` tokens at a time; rows of `known` without NaN (a = 0 points) are reused.
    `bar` counts the forwards."""
    ends = known.clone() if known is not None else torch.full(
        (len(jobs), len(ctx.steps)), float("nan"), dtype=x[0].dtype, device=x[0].device)
    todo = ends.isnan().any(1).nonzero().squeeze(1)
    bar.expect(len(todo))
    with torch.no_grad():
        for lo in range(0, len(todo), chunk):
            idx = todo[lo:lo + chunk]
            side, rows, pos = jobs[idx].T
            emb = _moved(x, side, rows, pos, _token(base, side, rows, pos))
            ends[idx] = run_scored(ctx, target_fn, emb[0], emb[1], rows)[1]
            bar.advance(len(idx))
    return ends


@dataclasses.dataclass(frozen=True)
class _Terms:
    """SIG's per-token completeness. `jobs` [job 3]: (side, row, position) of each attributed
    token i. [job step]: `visible` (a real step that sees token i), `expected` E_i = f_t(x) -
    f_t(x_{i<-b}) and `size` = |f_t(x)| + |f_t(x_{i<-b})|, the scale of E_i's rounding; both 0
    where not visible."""

    jobs: Tensor
    visible: Tensor
    expected: Tensor
    size: Tensor

    def errors(self, attrs: Sequence[Tensor | None], cols: Tensor | None = None) -> Tensor:
        """err_i [job k]: the sum of token i's scores (`attrs` per side [batch k pos ...], at the
        steps `cols`, default all) minus E_i."""
        side, rows, pos = self.jobs.T
        sums = [a.flatten(3).sum(-1) for a in attrs if a is not None]
        got = [s[rows, :, pos.clamp(max=s.shape[2] - 1)] for s in sums]  # [job k]
        got = got[0] if len(got) == 1 else torch.where((side == 0)[:, None], got[0], got[1])
        cols = slice(None) if cols is None else cols
        return (got - self.expected[:, cols]) * self.visible[:, cols]

    def by_step(self, n_rows: int, values: Tensor) -> Tensor:
        """Per-token `values` [job k] summed over each row's tokens: [batch k]."""
        return values.new_zeros(n_rows, values.shape[1]).index_add_(0, self.jobs[:, 1], values)

    def scatter(self, ctx: Context, values: Tensor) -> list[Tensor | None]:
        """Per-token `values` [job k] laid out per side [batch k pos], zero elsewhere."""
        b = ctx.batch
        out = [values.new_zeros(len(b), values.shape[1], n)
               for n in (b.source_ids.shape[1], b.target_ids.shape[1])]
        for s in (0, 1):
            sel = self.jobs[:, 0] == s
            out[s].transpose(1, 2).index_put_((self.jobs[sel, 1], self.jobs[sel, 2]), values[sel])
        return out if ctx.attribute_target else [out[0], None]

    def measure(self, n_rows: int, err: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_converge.record`'s (delta, expected, f_x, f_base) [batch step] for SIG: record's
        relative error |delta| / |expected| is then sum_i |err_i| / sum_i |E_i| (no cancellation
        between tokens), and its rounding floor uses sum_i |f(x)| + |f(x_{i<-b})| (passed as f_x,
        with f_base 0)."""
        size = self.by_step(n_rows, self.size)
        return (self.by_step(n_rows, err.abs()), self.by_step(n_rows, self.expected.abs()), size,
                torch.zeros_like(size))


def _terms(ctx: Context, jobs: Tensor, f_x: Tensor, ends: Tensor) -> _Terms:
    """The completeness terms of `jobs` from f(x) [batch step] and f(x_{i<-b}) [job step]."""
    side, rows, pos = jobs.T
    real = ctx.batch.target_mask[:, ctx.steps][rows]
    visible = real & ((side == 0)[:, None] | (pos[:, None] < ctx.steps[None]))
    return _Terms(jobs, visible, (f_x[rows] - ends) * visible,
                  (f_x[rows].abs() + ends.abs()) * visible)


def _level(ctx, target_fn, x, base, terms: _Terms, method: str, chunk: int, *,
           bar: Reporter) -> _converge.LevelFn:
    """`_converge.LevelFn` of SIG: n points of `method` at some rows and steps.

    `refine` judges step_sums(attrs) - expected against tolerance * |expected|. SIG's measure is
    per token: sum_i |err_i| against tolerance * sum_i |E_i|. With attrs = |err_i| + |E_i| at token
    i and expected = sum_i |E_i| (`_Terms.measure`), refine's delta is sum_i |err_i| and its bar
    tolerance * sum_i |E_i|: SIG's measure exactly. The results are the gradient sums per side."""
    diffs = [t - b for t, b in zip(x, base)]
    jobs = terms.jobs

    def compute(sub: Context, n: int, rows: list[int]):
        cols = torch.searchsorted(ctx.steps, sub.steps)
        keep = torch.isin(jobs[:, 1], torch.tensor(rows, device=jobs.device))
        keep &= terms.visible[:, cols].any(1)  # a target token that no step left sees: skipped
        alphas, weights = _paths.quadrature(method, n)
        grads, _ = _sig_grads(sub, target_fn, x, base, jobs[keep], alphas, weights, chunk, bar=bar)
        err = terms.errors([g * d[:, None] for g, d in zip(grads, diffs)], cols)
        return grads, terms.scatter(sub, err.abs() + terms.expected[:, cols].abs())

    return compute


def _integrate(ctx, target_fn, x, base, f_x, *, n_steps, tolerance, max_steps, method, chunk,
               bar: Reporter):
    """Gradient sums per side at `n_steps` points, or refined per step ("auto"); the completeness
    terms; the points used (an int, or [batch step]). `bar` shows the points and the forwards."""
    jobs = _jobs(ctx)
    if n_steps != "auto":
        alphas, weights = _paths.quadrature(method, n_steps)
        bar.update(detail=f"{n_steps} points")
        grads, at_zero = _sig_grads(ctx, target_fn, x, base, jobs, alphas, weights, chunk, bar=bar)
        ends = _token_ends(ctx, target_fn, x, base, jobs, chunk, known=at_zero, bar=bar)
        return grads, _terms(ctx, jobs, f_x, ends), n_steps
    bar.update(detail="tokens at their baseline")
    terms = _terms(ctx, jobs, f_x, _token_ends(ctx, target_fn, x, base, jobs, chunk, bar=bar))
    _, expected, size, zero = terms.measure(len(ctx.batch), torch.zeros_like(terms.expected))
    compute = _level(ctx, target_fn, x, base, terms, method, chunk, bar=bar)
    grads, _, points = _converge.refine(ctx, compute, expected, size, zero, tolerance=tolerance,
                                        max_steps=max_steps, reporter=bar)
    return grads, terms, points


@attribution_method(family="gradients", reduction="sum")
def sequential_integrated_gradients(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_steps: int | Literal["auto"] = "auto", tolerance: float = _converge.TOLERANCE,
    max_steps: int = 128,
    method: str = "gausslegendre", internal_batch_size: int = 64,
    baseline: Baseline = "auto", multiply_by_inputs: bool = True,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """Sequential integrated gradients (Enguehard 2023, arXiv:2305.15853): for each token, IG
    along the path that moves that token alone from its baseline to its embedding while every
    other token keeps its value. Token i's scores of step t sum to E_i = f_t(x) - f_t(x_{i<-b}),
    f_t at the input with token i alone at its baseline.

    Each token's path is integrated with `n_steps` points of the quadrature `method`. With
    `n_steps="auto"` (the default) each step gets 8, 16, 32, ... points (up to `max_steps`) until
    its completeness error sum_i |err_i| is at most `tolerance` times sum_i |E_i| (err_i: token
    i's score sum minus E_i; sums over the tokens the step attributes and sees); steps that miss
    it are named in one `ConvergenceWarning`. Every result records the tolerance, each step's
    relative error sum_i |err_i| / sum_i |E_i|, the unconverged steps and the points used in
    `meta["completeness"]`. One forward per (token, path point), shared by every generated step
    (causal masking), plus one forward without gradient per token for f(x_{i<-b}) (none where
    the rule has the point 0, e.g. "riemann_left", and `n_steps` is a number); chunks of
    `internal_batch_size` sequences. Works for decoder-only and encoder-decoder models, forced or
    generated targets, and target tokens with `attribute_target=True`. Other options as in
    `integrated_gradients`; the cost is about the number of attributed tokens times IG's.
    `progress=True` shows the points and the (token, point) forwards done on stderr.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]), and `delta`
    [batch step]: sum_i err_i = sum_i (sum of token i's scores - (f_t(x) - f_t(x_{i<-b}))), the
    total per-token completeness error (per-token errors of opposite signs may cancel in it;
    the record does not). `delta` is None with `multiply_by_inputs=False`.

    >>> out = sequential_integrated_gradients(model, batch, n_steps=16)
    >>> out.delta.abs().max()   # total per-token completeness error
    """
    _converge.check_options(n_steps, tolerance, max_steps)
    path_quadrature(n_steps, method, internal_batch_size)
    args = call_args(sequential_integrated_gradients, locals())
    with (report(progress, "sequential_integrated_gradients", unit="forwards") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, baseline)
        with torch.no_grad():
            clean, f_x = run_scored(ctx, target_fn, *x)
        grads, terms, points = _integrate(ctx, target_fn, x, base, f_x, n_steps=n_steps,
                                          tolerance=tolerance, max_steps=max_steps, method=method,
                                          chunk=internal_batch_size, bar=bar)
        attrs = [g * (t - b)[:, None] for g, t, b in zip(grads, x, base)]
        err = terms.errors(attrs)
        record = _converge.record(ctx, *terms.measure(len(ctx.batch), err), tolerance, points)
        scores = attrs if multiply_by_inputs else grads
        out = finish(ctx, method="sequential_integrated_gradients", args=args, target_fn=target_fn,
                     source=scores[0], target=scores[1] if ctx.attribute_target else None,
                     step_scores=logit_step_scores(ctx, clean.logits, target_fn, step_scores))
        if n_steps == "auto":
            _converge.warn_unconverged(ctx, "sequential_integrated_gradients", record, max_steps)
        delta = terms.by_step(len(ctx.batch), err) * ctx.batch.target_mask[:, ctx.steps]
        return out.replace(delta=delta.cpu() if multiply_by_inputs else None,
                           meta={**out.meta, **record})

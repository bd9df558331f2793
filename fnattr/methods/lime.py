"""LIME: a weighted linear surrogate per step over random token masks, one forward per mask.

A mask keeps or occludes every ordinary token; one forward of the masked input scores all steps
(causal masking), and each step fits its own surrogate over the tokens it can see.
"""

import functools
import math
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fnattr.batch import Batch
from fnattr.attribution import (
    Context, StepScoreSpec, attribution_context, check_finite, clean_logits, finish, fn_name,
    logit_step_scores,
)
from fnattr import group_features as _grouped
from fnattr.methods.integrated_gradients import baselines
from fnattr.methods.occlusion import Fill, occludable, perturbed_scores
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def sample_masks(n_samples: int, n_features: int, *, seed: int,
                 keep_prob: float = 0.5) -> Bool[Tensor, "n_samples n_features"]:
    """Random keep-masks: sample 0 keeps every feature (the input itself), the others keep each
    feature with probability `keep_prob`. A pure function of its arguments, drawn feature by
    feature: the masks of the first f features do not depend on how many follow, so a step's
    masks are the same whether later target tokens exist (one pass) or not (per-step runs)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n_features, n_samples, generator=gen, dtype=torch.float64).T < keep_prob
    keep[0] = True
    return keep


def kernel_weights(keep: Float[Tensor, "*b n f"], visible: Float[Tensor, "*b f"],
                   kernel_width: float) -> Float[Tensor, "*b n"]:
    """exp(-d^2 / width^2) with d the cosine distance between a mask and the input (all ones),
    over the visible features (LIME's text kernel, distances in [0, 1])."""
    n_vis = visible.sum(-1, keepdim=True)
    kept = (keep * visible[..., None, :]).sum(-1)
    cosine = torch.where(n_vis > 0, (kept / n_vis.clamp(min=1)).sqrt(), torch.ones_like(kept))
    return torch.exp(-((1 - cosine) ** 2) / kernel_width**2)


def fit_surrogates(
    keep: Float[Tensor, "*b n f"], scores: Float[Tensor, "*b n"], weights: Float[Tensor, "*b n"],
    visible: Float[Tensor, "*b f"], alpha: float,
) -> Float[Tensor, "*b f"]:
    """Ridge-weighted least squares `scores ~ c + keep @ coef` over the visible features (no
    penalty on the intercept c); invisible features get exactly 0. Solved in batch by lstsq
    (SVD driver on CPU: minimum-norm for rank-deficient designs, and reproducible)."""
    x = keep * visible[..., None, :]
    design = torch.cat([torch.ones_like(x[..., :1]), x], -1) * weights[..., None].sqrt()
    penalty = torch.where(visible > 0, alpha**0.5, 1.0)  # pins invisible features to 0
    ridge = torch.diag_embed(torch.cat([torch.zeros_like(penalty[..., :1]), penalty], -1))[..., 1:, :]
    lhs = torch.cat([design, ridge], -2)
    rhs = torch.cat([scores * weights.sqrt(), torch.zeros_like(penalty)], -1)
    # gelsd (SVD) on the CPU: gelsy's result varies run to run, and CUDA offers only gels, which
    # assumes full rank and gave different surrogates on an H200. The systems are small.
    coef = torch.linalg.lstsq(lhs.cpu(), rhs[..., None].cpu(), driver="gelsd").solution[..., 0]
    return coef[..., 1:].to(visible.device) * visible


PerturbFn = Callable[..., Tensor]      # (n_samples, n_features, *, seed) -> keep [n f] bool
SimilarityFn = Callable[[Tensor, Tensor], Tensor]  # (keep [*b n f], visible [*b f]) -> [*b n]
SurrogateFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (keep, y, w, visible) -> [*b f]


def _user_masks(perturb_fn: PerturbFn, n_samples: int, n: int, seed: int) -> Tensor:
    keep = perturb_fn(n_samples, n, seed=seed)
    if not (isinstance(keep, Tensor) and keep.dtype == torch.bool and keep.shape == (n_samples, n)):
        got = (f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor)
               else type(keep).__name__)
        raise ValueError(f"`perturb_fn` returned {got} for {n_samples} samples of {n} features: "
                         f"return a bool tensor [{n_samples}, {n}] (True keeps a token).")
    return keep.cpu()


def _checked(name: str, value: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` returned {got}: it must return a tensor of shape {shape} "
                         "(see `lime`'s docstring).")
    return value.to(like)


def _features(ctx: Context):
    """Per row: side (0 source, 1 target) and position of each feature, and which are real."""
    src, tgt = occludable(ctx)
    per_row = [[(0, int(i)) for i in s.nonzero()] + [(1, int(j)) for j in t.nonzero()]
               for s, t in zip(src, tgt)]
    n_feat = max(1, max(len(r) for r in per_row))
    side = torch.zeros(len(per_row), n_feat, dtype=torch.long)
    pos = torch.zeros(len(per_row), n_feat, dtype=torch.long)
    real = torch.zeros(len(per_row), n_feat, dtype=torch.bool)
    for b, row in enumerate(per_row):
        for f, (s, p) in enumerate(row):
            side[b, f], pos[b, f], real[b, f] = s, p, True
    return side, pos, real, [len(r) for r in per_row]


def _masks(ctx: Context, side, pos, real, keep):
    """Occlusion masks [rows * n, src] and [rows * n, tgt] from keep-masks [rows, n, feature]."""
    n_src, n_tgt = ctx.batch.source_ids.shape[1], ctx.batch.target_ids.shape[1]
    flat = torch.where(real, pos + side * n_src, n_src + n_tgt)  # padding features: a spare column
    occluded = torch.zeros(*keep.shape[:2], n_src + n_tgt + 1, dtype=torch.bool)
    occluded.scatter_(2, flat[:, None, :].expand_as(keep), ~keep)
    occluded = occluded.flatten(0, 1).to(ctx.batch.source_ids.device)
    return occluded[:, :n_src], occluded[:, n_src:-1]


def _to_positions(ctx: Context, coef, side, pos, real) -> tuple[Tensor, Tensor]:
    """Coefficients [rows, step, feature] scattered to source and target token positions."""
    out = []
    for s, width in enumerate((ctx.batch.source_ids.shape[1], ctx.batch.target_ids.shape[1])):
        mine = ((side == s) & real)[:, None, :].to(coef.device)
        scores = coef.new_zeros(*coef.shape[:2], width + 1)
        index = torch.where(mine, pos[:, None, :].to(coef.device), width).expand_as(coef)
        out.append(scores.scatter_add_(2, index, coef * mine)[..., :width])
    return out[0], out[1]


@attribution_method(family="perturbations", reduction="sum")
def lime(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    n_samples: int = 200, kernel_width: float = 0.25, keep_prob: float = 0.5,
    alpha: float = 1.0, seed: int | None = None, baseline: Fill = "auto",
    internal_batch_size: int = 32, perturb_fn: PerturbFn | None = None,
    similarity_fn: SimilarityFn | None = None, surrogate_fn: SurrogateFn | None = None,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """LIME (Ribeiro et al. 2016, arXiv:1602.04938) with token features, for every step.

    `n_samples` random masks (the first keeps every token) occlude ordinary tokens with the
    `baseline` embedding (as in `occlusion`); one forward per mask scores every step. Step t fits a ridge (`alpha`)
    weighted least squares surrogate over the tokens it can see, with LIME's text kernel
    exp(-d^2 / kernel_width^2) on the cosine distance d to the input. Masks depend only on
    `seed` and a row's token count (so batched equals unbatched); `seed=None` draws one from
    the operating system (recorded in `meta["args"]`; torch's global generator is left as it
    was). Special tokens score 0. `progress=True` shows the masked copies done on stderr.

    Your own parts, plain callables (inseq/captum's `perturb_func`, `similarity_func`,
    `interpretable_model`); each replaces the built-in one and its options:
    - `perturb_fn(n_samples, n_features, *, seed) -> keep [n_samples n_features]` (bool, True
      keeps a token), called per row with the row's token count; default `sample_masks` with
      `keep_prob`.
    - `similarity_fn(keep [rows step n f], visible [rows step f]) -> weights [rows step n]`
      (float 0/1 masks); default `kernel_weights` with `kernel_width`.
    - `surrogate_fn(keep, scores [rows step n], weights, visible) -> coef [rows step f]`: the
      attribution of each feature; default `fit_surrogates` with `alpha`. Features a step
      cannot see (`visible` 0) are zeroed after it.

    A batch with feature groups (`prepare(groups=...)`) has one feature per source group
    (its ordinary tokens occluded together), and the result one score per group.

    Returns `source` [batch step src] and `target` [batch step tgt]: the surrogate's
    coefficients (`extra_dims` ()), and the step scores of the unmasked input.

    >>> out = lime(model, batch, n_samples=300, seed=0)
    """
    if n_samples < 2:
        raise ValueError(f"`n_samples`={n_samples}: it must be at least 2 (sample 0 is the input).")
    if internal_batch_size < 1:
        raise ValueError(f"`internal_batch_size`={internal_batch_size}: it must be at least 1.")
    if not 0 < keep_prob < 1 or not 0 < kernel_width < math.inf or not 0 <= alpha < math.inf:
        raise ValueError(f"`keep_prob`={keep_prob} must be in (0, 1), `kernel_width`={kernel_width} "
                         f"positive, `alpha`={alpha} non-negative, both finite.")
    if seed is None:  # from the OS: torch's global generator stays as it was
        seed = torch.Generator().seed() % 2**62
    args = call_args(lime, locals())
    with (report(progress, "lime", unit="perturbations") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        emb = ctx.embedded
        logits = clean_logits(ctx)
        grouped = ctx.batch.source_groups is not None
        if grouped:  # source features are whole groups (`_grouped`)
            side, pos, real, counts, member = _grouped.lime_features(ctx, occludable(ctx))
        else:
            side, pos, real, counts = _features(ctx)
        keep = torch.zeros(len(counts), n_samples, side.shape[1], dtype=torch.bool)
        for b, n in enumerate(counts):
            keep[b, :, :n] = (sample_masks(n_samples, n, seed=seed, keep_prob=keep_prob)
                              if perturb_fn is None else _user_masks(perturb_fn, n_samples, n, seed))
        rows = torch.arange(len(counts), device=emb.source.device).repeat_interleave(n_samples)
        masks = _masks(ctx, side, pos, real, keep | (grouped & (side == 0))[:, None, :])
        if grouped:
            masks = (_grouped.lime_source_masks(member, keep).to(masks[0].device), masks[1])
        y = perturbed_scores(ctx, target_fn, rows, masks, baselines(ctx, baseline),
                             internal_batch_size, bar=bar)
        y = y.unflatten(0, (len(counts), n_samples)).transpose(1, 2)  # [rows, step, n]
        steps = ctx.steps.cpu()
        visible = real[:, None, :] & ((side == 0)[:, None, :] | (pos[:, None, :] < steps[None, :, None]))
        vis, z = visible.to(y), keep[:, None].to(y).expand(-1, len(steps), -1, -1)
        scores = logit_step_scores(ctx, logits, target_fn, step_scores)
        # before the solver, which fails on NaN with "false INTERNAL ASSERT FAILED"
        check_finite(ctx, "lime", {**scores, f"{fn_name(target_fn)} of the perturbed inputs": y}, args)
        bar.update(detail="fitting surrogates")
        similarity = similarity_fn or functools.partial(kernel_weights, kernel_width=kernel_width)
        surrogate = surrogate_fn or functools.partial(fit_surrogates, alpha=alpha)
        weights = _checked("similarity_fn", similarity(z, vis), tuple(y.shape), y)
        coef = _checked("surrogate_fn", surrogate(z, y, weights, vis), tuple(vis.shape), y) * vis
        src, tgt = _to_positions(ctx, coef, side, pos, real)
        if grouped:
            src = torch.zeros_like(src)  # the group coefficients replace the source axis below
        out = finish(ctx, method="lime", args=args, target_fn=target_fn, source=src,
                     target=tgt if ctx.attribute_target else None,
                     step_scores=scores,
                     extra_dims=())
        if not grouped:
            return out
        return _grouped.result(ctx, out, _grouped.to_groups(coef, side, pos, real,
                                                            _grouped.n_groups(ctx)))

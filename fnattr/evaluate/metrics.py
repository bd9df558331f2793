"""Faithfulness of an attribution: does the model's output fall when its top tokens go?

For the model, batch and target function an `AttributionTensors` explains, every generated step
ranks the tokens it can see by decreasing attribution and loses them level by level:

- comprehensiveness and sufficiency (ERASER, DeYoung et al. 2020, arXiv:1911.03429) at removal
  `fractions`, and their AOPC (the mean over the fractions): f(x) - f(x without its top-q
  tokens), f(x) - f(x with only its top-q tokens);
- deletion and insertion curves (RISE, Petsiuk et al. 2018, arXiv:1806.07421): f after each of
  `curve_levels` evenly spaced levels of removal from x (deletion) or of insertion into the
  input with every removable token removed (insertion), and the area under the curve over the
  fraction axis [0, 1];
- the same metrics for `n_random` seeded random rankings: what "no better than chance" scores.

A step can lose the real, non-special tokens it reads: the source, and the earlier target tokens
when the attribution has `target` scores. Fractions are of those tokens, rounded up, at least
one per level. Removal replaces a token's embedding by the neutral baseline the methods use
(`removal="auto"`, see `fnattr.baselines`; or "unk", "pad", "zeros"), or, with
`removal="mask"`, drops it from the attention mask (on decoder-only models the position ids
close the gap, so this is deleting the token; a step keeps the token at its own query
position, which it reads through its residual stream; encoder-decoder models: source side
only, as the engine passes no decoder attention mask).

A batch with feature groups (`prepare(groups=...)`) is evaluated by groups: the attribution is
reduced to them (`out.grouped()`), the fractions are of the removable groups, and removing a
group removes all its ordinary tokens (`fnattr._evaluate_groups`; removal="mask" is refused).

Rankings: `ranking="step"` (the default) ranks each step's tokens by that step's scores;
`ranking="example"` ranks an example's tokens once, by the attribution summed over its steps,
and removes the same tokens for every step (fractions are then of the example's removable
tokens, and a step loses the part of them it reads). The random rankings follow `ranking`.

Cost, in forward rows (`internal_batch_size` rows per forward, plus one clean forward):
with `ranking="step"` one row per (example, real step, level), since each step needs its own
input (the forward scores every step of a copy; only the step it was built for is kept); with
`ranking="example"` one row per (example, level), which serves every step. The levels:
len(fractions) each for comprehensiveness and sufficiency, `curve_levels` each for deletion and
insertion (their level that is x itself reuses the clean forward). All of it times
(1 + `n_random`), and twice for a contrastive target that reruns its contrast. Identical inputs
run once (comprehensiveness at 10 % and the deletion curve at 0.1, the all-removed input that
both curves and every random draw share, the many equal levels of a short input);
`meta["forward_rows"]` says how many rows ran.

>>> out = fnattr.methods.integrated_gradients(model, batch)
>>> faith = faithfulness(model, batch, out)
>>> faith.summary()["comprehensiveness"]   # {'value': ..., 'random_mean': ..., ...}
"""

import functools
import json
import math
import warnings
from typing import Any
from collections.abc import Sequence

import torch
from torch import Tensor

from fnattr.evaluate import groups as _evaluate_groups
from fnattr.evaluate import ranking as rk
from fnattr.evaluate.results import HIGHER_IS_BETTER, METRICS, Faithfulness, load, save
from fnattr.evaluate.removal import copy_scores
from fnattr.aggregate import Reducer
from fnattr.baselines import baselines, resolve_baseline
from fnattr.batch import Batch
from fnattr.attribution import attribution_context, fn_name, run_scored
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn
from fnattr.render.views import default_reduction

__all__ = ["FRACTIONS", "HIGHER_IS_BETTER", "METRICS", "Faithfulness", "comprehensiveness",
           "deletion", "faithfulness", "insertion", "load", "save", "sufficiency"]

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)
REMOVALS = ("auto", "unk", "pad", "zeros", "mask")


def _check_options(metrics, fractions, curve_levels, removal, ranking, sign, n_random,
                   internal_batch_size) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"`metrics`={tuple(metrics)!r}: choose among {METRICS}.")
    bad = [q for q in fractions
           if isinstance(q, bool) or not (isinstance(q, (int, float)) and 0 < q <= 1)]
    if bad or not fractions:
        raise ValueError(f"`fractions`={tuple(fractions)!r}: give fractions of the tokens in (0, 1], "
                         f"e.g. {FRACTIONS}.")
    for name, value, low in (("curve_levels", curve_levels, 1), ("n_random", n_random, 0),
                             ("internal_batch_size", internal_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}`={value!r}: it must be an integer of at least {low}.")
    for name, value, allowed in (("removal", removal, REMOVALS), ("ranking", ranking, rk.RANKINGS),
                                 ("sign", sign, rk.SIGNS)):
        if value not in allowed:
            raise ValueError(f"`{name}`={value!r}: use one of {allowed}.")


def _check_result(out: AttributionTensors, batch: Batch, removal: str) -> None:
    same = all(a.shape == b.shape and torch.equal(a, b.cpu()) for a, b in (
        (out.source_ids, batch.source_ids), (out.target_ids, batch.target_ids),
        (out.source_mask, batch.source_mask), (out.target_mask, batch.target_mask)))
    if not same:
        raise ValueError("`attributions` was computed for another batch (its token ids or masks "
                         "differ from `batch`'s): pass the batch the method ran on, or rerun the "
                         "method on this batch. Word-merged results (aggregate.merge) cannot be "
                         "evaluated: evaluate the per-token result.")
    steps = out.steps.cpu()
    if not len(steps) or not torch.equal(steps, torch.arange(int(steps[0]), int(steps[0]) + len(steps))):
        raise ValueError(f"`attributions.steps`={steps.tolist()} is not a range of target positions: "
                         "pass a result as a method returned it.")
    if removal == "mask" and batch.is_encoder_decoder and out.target is not None:
        raise ValueError("`removal`='mask' cannot remove decoder tokens of an encoder-decoder model "
                         "(the engine passes no decoder attention mask): use removal='auto', or an "
                         "attribution without target scores (attribute_target=False).")


def _plan(ctx, out, *, fractions, levels, metrics, ranking, sign, reduction, n_random, seed,
          mask_removal):
    """(removable tokens per ranking unit [b unit], removal masks [draw b unit L P]) for the
    attribution (draw 0) and the random draws. The levels: comprehensiveness's fractions and the
    deletion levels (top tokens removed), then sufficiency's and insertion's (top tokens kept),
    each where asked for."""
    batch, steps = ctx.batch, ctx.steps
    can = rk.candidates(batch, steps, target=out.target is not None, mask=mask_removal)
    scores = rk.token_scores(out, reduction).to(device=can.device, dtype=torch.float64)
    if torch.isnan(scores).any():
        raise ValueError("`attributions` holds NaN scores: they cannot rank tokens.")
    if ranking == "example":
        scores = (scores * batch.target_mask[:, steps][..., None]).sum(1, keepdim=True)
        can = rk.example_candidates(can, batch, steps, mask=mask_removal)[:, None, :]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n_random, *can.shape), generator=gen, dtype=torch.float64)
    key = torch.cat([rk.keys(scores, sign)[None], noise.to(can.device)])
    rank = rk.ranks(key, can.expand_as(key))
    n = can.sum(-1)
    remove = [rk.counts(fractions, n)] * ("comprehensiveness" in metrics) + \
        [rk.counts(levels, n)] * ("deletion" in metrics)
    keep = [rk.counts(fractions, n)] * ("sufficiency" in metrics) + \
        [rk.counts(levels, n)] * ("insertion" in metrics)
    empty = n.new_zeros(*n.shape, 0)
    remove, keep = (torch.cat(c or [empty], -1).expand(len(key), *n.shape, -1) for c in (remove, keep))
    return n, rk.removal_masks(rank, can.expand_as(key), remove, keep)


def _scores(ctx, target_fn, f_x, drop, fills, chunk, ranking):
    """f at every (draw, row, unit, level) removal, for the step each one is for: [draw b step L]."""
    d, b, u, n_levels, width = drop.shape
    rows = torch.arange(b, device=drop.device)[None, :, None, None].expand(d, b, u, n_levels)
    rows_u, drop_u, inverse = rk.unique_copies(rows.reshape(-1), drop.reshape(-1, width))
    values = f_x[rows_u]  # a copy that removes nothing is x itself
    todo = drop_u.any(1)
    if todo.any():
        values[todo] = copy_scores(ctx, target_fn, rows_u[todo], drop_u[todo], fills, chunk).to(values)
    per = values[inverse].view(d, b, u, n_levels, -1)
    per = per[:, :, 0] if ranking == "example" else per.diagonal(dim1=2, dim2=4)
    return per.transpose(-1, -2), int(todo.sum())


def clean_and_fills(ctx, target_fn: TargetFn, removal: str) -> tuple[Tensor, bool, Any]:
    """The target's score at the clean input `[batch step]`, whether `removal` masks tokens out of
    the attention, and otherwise the embeddings that replace removed tokens (`baselines`)."""
    emb = ctx.embedded
    with torch.no_grad():
        f_x = run_scored(ctx, target_fn, emb.source, emb.target)[1]
    mask_removal = removal == "mask"
    return f_x, mask_removal, None if mask_removal else baselines(ctx, removal)


def faithfulness(
    model: Model, batch: Batch, attributions: AttributionTensors, target_fn: TargetFn = probability,
    *, metrics: Sequence[str] = METRICS, fractions: Sequence[float | int] = FRACTIONS,
    curve_levels: int = 10, removal: str = "auto", ranking: str = "step", sign: str = "signed",
    reduction: str | Reducer | None = None, n_random: int = 5, seed: int = 0,
    internal_batch_size: int = 32,
) -> Faithfulness:
    """Comprehensiveness, sufficiency (with AOPC), deletion and insertion curves (with AUC) of
    `attributions` for `model`, `batch` and `target_fn`, per example and step, and the same for
    `n_random` random rankings (module docstring: definitions and cost).

    `metrics`: which to compute. `fractions`: ERASER's removal fractions. `curve_levels` K: the
    curves are scored at fractions 0, 1/K, ..., 1. `removal`: "auto" (the methods' neutral
    baseline), "unk", "pad", "zeros" or "mask". `ranking`: "step" or "example". `sign`: rank by
    the "signed" score (positive evidence first), its "positive" part (the rest tie, in
    position order) or its magnitude ("abs"). `reduction` of the extra dims: as the views do
    (`fnattr.views.default_reduction`) unless given. `seed` seeds the random rankings
    (the global generators are left alone).

    Returns a `Faithfulness` (tensors on the CPU); the model is left as it was.

    >>> faith = faithfulness(model, batch, fnattr.methods.occlusion(model, batch), n_random=10)
    >>> faith.area("comprehensiveness")   # AOPC per [batch, step]
    """
    metrics = tuple(metrics)
    _check_options(metrics, fractions, curve_levels, removal, ranking, sign, n_random,
                   internal_batch_size)
    grouped = batch.source_groups is not None  # units: the groups (`_evaluate_groups`)
    if grouped:
        attributions = _evaluate_groups.check(attributions, batch, removal)
    else:
        _check_result(attributions, batch, removal)
    named, used = attributions.meta.get("target_fn"), fn_name(target_fn)
    if named and named != used:
        warnings.warn(f"`attributions` explain {named!r}; evaluating with `target_fn` {used!r}.",
                      UserWarning, stacklevel=2)
    levels = [i / curve_levels for i in range(curve_levels + 1)]
    start = int(attributions.steps[0])
    with attribution_context(model, batch, attribute_target=attributions.target is not None,
                             attr_pos_start=start, attr_pos_end=start + len(attributions.steps)) as ctx:
        f_x, mask_removal, fills = clean_and_fills(ctx, target_fn, removal)
        plan = functools.partial(_evaluate_groups.plan, ctx, plan_fn=_plan) if grouped else \
            functools.partial(_plan, ctx)
        n, drop = plan(attributions, fractions=fractions, levels=levels, metrics=metrics,
                       ranking=ranking, sign=sign, reduction=reduction,
                       n_random=n_random, seed=seed, mask_removal=mask_removal)
        values, rows_run = _scores(ctx, target_fn, f_x, drop, fills, internal_batch_size, ranking)
        step_mask = ctx.batch.target_mask[:, ctx.steps]
        tensors = _metrics(f_x, values, metrics, len(fractions), len(levels), step_mask)
        meta = _meta(ctx, attributions, target_fn, removal, ranking=ranking, sign=sign,
                     reduction=reduction, fractions=fractions, curve_levels=curve_levels,
                     n_random=n_random, seed=seed, rows=rows_run, chunk=internal_batch_size)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    return Faithfulness(
        score=cpu(f_x * step_mask), steps=cpu(ctx.steps), step_mask=cpu(step_mask),
        removable=cpu(n.expand_as(step_mask) * step_mask),
        fractions=torch.tensor([float(q) for q in fractions], dtype=torch.float64),
        levels=torch.tensor(levels, dtype=torch.float64),
        **{k: cpu(v) for k, v in tensors.items()}, meta=meta)


def _metrics(f_x: Tensor, values: Tensor, metrics: tuple[str, ...], n_q: int, n_l: int,
             step_mask: Tensor) -> dict[str, Tensor]:
    """The metric tensors (the attribution's, then the random draws') from the scores at each
    level, laid out as `_plan` lays out the levels."""
    full, mask = f_x[None, :, :, None], step_mask[None, :, :, None]
    out, off = {}, 0
    for name, width in (("comprehensiveness", n_q), ("deletion", n_l), ("sufficiency", n_q),
                        ("insertion", n_l)):
        if name not in metrics:
            continue
        got = values[..., off:off + width]
        off += width
        got = (full - got if name in ("comprehensiveness", "sufficiency") else got) * mask
        out[name] = got[0]
        if len(got) > 1:
            out[f"random_{name}"] = got[1:]
    return out


def _meta(ctx, out, target_fn, removal, *, rows, chunk, reduction, **options) -> dict[str, str]:
    if removal == "mask":
        words = ("attention mask: tokens dropped from it (the engine's position ids, the cumulative "
                 "sum of the mask, close the gap)" if not ctx.batch.is_encoder_decoder
                 else "attention mask: source tokens dropped from it")
    else:
        words = resolve_baseline(ctx.batch, removal)[2]
    how = default_reduction(out) if reduction is None else getattr(reduction, "__name__", reduction)
    return {
        "removal": words, "removal_kind": removal, "ranking": options["ranking"],
        "sign": options["sign"], "reduction": str(how), "target_fn": fn_name(target_fn),
        "method": out.meta.get("method", ""), "attribution_target_fn": out.meta.get("target_fn", ""),
        "options": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}),
        "forward_rows": str(rows), "forwards": str(1 + math.ceil(rows / chunk)),
    }


def comprehensiveness(model: Model, batch: Batch, attributions: AttributionTensors,
                      target_fn: TargetFn = probability, **options) -> Faithfulness:
    """`faithfulness(..., metrics=("comprehensiveness",))`: ERASER comprehensiveness and AOPC."""
    return faithfulness(model, batch, attributions, target_fn, metrics=("comprehensiveness",), **options)


def sufficiency(model: Model, batch: Batch, attributions: AttributionTensors,
                target_fn: TargetFn = probability, **options) -> Faithfulness:
    """`faithfulness(..., metrics=("sufficiency",))`: ERASER sufficiency and AOPC."""
    return faithfulness(model, batch, attributions, target_fn, metrics=("sufficiency",), **options)


def deletion(model: Model, batch: Batch, attributions: AttributionTensors,
             target_fn: TargetFn = probability, **options) -> Faithfulness:
    """`faithfulness(..., metrics=("deletion",))`: the deletion curve and its AUC."""
    return faithfulness(model, batch, attributions, target_fn, metrics=("deletion",), **options)


def insertion(model: Model, batch: Batch, attributions: AttributionTensors,
              target_fn: TargetFn = probability, **options) -> Faithfulness:
    """`faithfulness(..., metrics=("insertion",))`: the insertion curve and its AUC."""
    return faithfulness(model, batch, attributions, target_fn, metrics=("insertion",), **options)

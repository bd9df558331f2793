"""Faithfulness of several attributions of the same batch in shared forwards.

`fnattr.evaluate.faithfulness` scores one attribution: its removal copies and those of its random
rankings. Several methods' attributions of one batch need many of the same copies: the random
rankings are the same for every method (they depend on the seed and on which tokens can go, not
on the scores), and the all-removed input and short inputs' levels coincide. `faithfulness_many`
plans every method's copies, runs each distinct (example, removal) copy once, in the same
batches, and hands each method its values: the numbers `faithfulness` gives each method alone,
the random rankings' (chance) identical for all methods by construction.
"""

import warnings
from collections.abc import Mapping

import torch

from fnattr.evaluate import metrics as ev
from fnattr.batch import Batch
from fnattr.attribution import attribution_context, fn_name
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _group_key(out: AttributionTensors) -> tuple[int, int, bool]:
    return int(out.steps[0]), len(out.steps), out.target is not None


def faithfulness_many(
    model: Model, batch: Batch, attributions: Mapping[str, AttributionTensors],
    target_fn: TargetFn = probability, *, metrics=ev.METRICS, fractions=ev.FRACTIONS,
    curve_levels: int = 10, removal: str = "auto", ranking: str = "step", sign: str = "signed",
    reduction=None, n_random: int = 5, seed: int = 0, internal_batch_size: int = 32,
) -> dict[str, ev.Faithfulness]:
    """`{name: fnattr.evaluate.faithfulness(model, batch, out, target_fn, **options)}` for every
    `attributions[name]`, in shared forwards (module docstring). Attributions with the same steps
    and sides share one set of forwards; `meta["forward_rows"]` counts that set's rows, and
    `meta["shared_with"]` names the methods that shared them."""
    metrics = tuple(metrics)
    ev._check_options(metrics, fractions, curve_levels, removal, ranking, sign, n_random,
                      internal_batch_size)
    used = fn_name(target_fn)
    for out in attributions.values():
        ev._check_result(out, batch, removal)
        named = out.meta.get("target_fn")
        if named and named != used:
            warnings.warn(f"`attributions` explain {named!r}; evaluating with `target_fn` {used!r}.",
                          UserWarning, stacklevel=2)
    groups: dict[tuple, list[str]] = {}
    for name, out in attributions.items():
        groups.setdefault(_group_key(out), []).append(name)
    options = {"metrics": metrics, "fractions": fractions, "curve_levels": curve_levels,
               "removal": removal, "ranking": ranking, "sign": sign, "reduction": reduction,
               "n_random": n_random, "seed": seed, "internal_batch_size": internal_batch_size}
    done: dict[str, ev.Faithfulness] = {}
    for names in groups.values():
        done.update(_group(model, batch, {n: attributions[n] for n in names}, target_fn, **options))
    return {name: done[name] for name in attributions}


def _group(model, batch, attributions, target_fn, *, metrics, fractions, curve_levels, removal,
           ranking, sign, reduction, n_random, seed, internal_batch_size):
    first = next(iter(attributions.values()))
    levels = [i / curve_levels for i in range(curve_levels + 1)]
    start = int(first.steps[0])
    with attribution_context(model, batch, attribute_target=first.target is not None,
                             attr_pos_start=start, attr_pos_end=start + len(first.steps)) as ctx:
        f_x, mask_removal, fills = ev.clean_and_fills(ctx, target_fn, removal)
        plans = {name: ev._plan(ctx, out, fractions=fractions, levels=levels, metrics=metrics,
                                ranking=ranking, sign=sign, reduction=reduction, n_random=n_random,
                                seed=seed, mask_removal=mask_removal)
                 for name, out in attributions.items()}
        drops = torch.cat([drop for _, drop in plans.values()])
        values, rows_run = ev._scores(ctx, target_fn, f_x, drops, fills, internal_batch_size, ranking)
        step_mask = ctx.batch.target_mask[:, ctx.steps]
        out_faith, offset = {}, 0
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        for name, out in attributions.items():
            n, drop = plans[name]
            mine = values[offset:offset + len(drop)]
            offset += len(drop)
            tensors = ev._metrics(f_x, mine, metrics, len(fractions), len(levels), step_mask)
            meta = ev._meta(ctx, out, target_fn, removal, ranking=ranking, sign=sign,
                            reduction=reduction, fractions=fractions, curve_levels=curve_levels,
                            n_random=n_random, seed=seed, rows=rows_run, chunk=internal_batch_size)
            meta["shared_with"] = ",".join(attributions)
            out_faith[name] = ev.Faithfulness(
                score=cpu(f_x * step_mask), steps=cpu(ctx.steps), step_mask=cpu(step_mask),
                removable=cpu(n.expand_as(step_mask) * step_mask),
                fractions=torch.tensor([float(q) for q in fractions], dtype=torch.float64),
                levels=torch.tensor(levels, dtype=torch.float64),
                **{k: cpu(v) for k, v in tensors.items()}, meta=meta)
    return out_faith

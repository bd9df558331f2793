"""What a heatmap shows, and the words that say it: the reduction of each method's `*extra`
dims, per-step normalisation, the baseline, and the steps whose path integral did not converge.

`heatmap(out)` is one batch row as a matrix with its title, caption lines and flagged columns;
`fnattr.render` draws it in a terminal, as HTML or as a PNG.
"""

import dataclasses
import json
import math
import unicodedata
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fnattr import aggregate, groups
from fnattr.aggregate import Reducer
from fnattr import registry
from fnattr.render.convergence import Convergence, convergence, method_args, read_meta, unconverged
from fnattr.result import AttributionTensors

# The default reduction (an `aggregate.REDUCERS` name) of each method's `*extra` dims: what
# each method declares (`fnattr.registry`; why each, in docs/methods.md).
DEFAULT_REDUCTION: Mapping[str, str] = registry.Reductions()
FALLBACK = registry.FALLBACK  # a method not declared (your own): the caption still names the reduction
FLAG = "\u26a0"  # marks the column of a step whose completeness error is too large
_WORDS = {"l2": "L2 norm", "absmax": "signed largest |score|"}


default_reduction = aggregate.default_reduction  # the method's own: `fnattr.registry`


def view(
    out: AttributionTensors, *, reduction: str | Reducer | None = None, normalize: bool = False,
    group_by: str | bool | Callable | None = None,
) -> AttributionTensors:
    """`out` as drawn: extra dims reduced (default: `default_reduction(out)`), then, with
    `group_by`, source tokens reduced to groups (`fnattr.groups.grouped`: True or the result's
    grouping name for its own groups, another splitter name or function to split its token
    texts), then, with `normalize`, each step divided by the sum of its absolute scores
    (`aggregate.normalize`).

    >>> view(out, normalize=True).source.shape   # [batch step src]
    >>> view(out, group_by="sentences").source_tokens   # the sentences' texts
    """
    if group_by is not None and group_by is not False:
        out = groups.grouped(out, None if group_by is True else group_by, reduction=reduction)
    shown = aggregate.reduce(out, default_reduction(out) if reduction is None else reduction)
    return aggregate.normalize(shown) if normalize else shown


_aggregations = aggregate.aggregations


def _words(name: str, args: list) -> str:
    if name == "normalize":
        return "normalised per step (|scores| of a column sum to 1)"
    if name == "rescale":
        return "rescaled per step (largest |score| of a column is 1)"
    if name == "merge" and len(args) == 2:
        return f"tokens merged by {args[0]} (merged steps: {args[1]})"
    if name == "grouped" and len(args) == 2:
        how = "L2 norm" if args[1] == "l2" else "sum"
        return f"source tokens grouped by {args[0]} ({how} of a group's token scores)"
    if name == "difference":
        return f"difference with a {' '.join(map(str, args))} run"
    return f"{_WORDS.get(name, name)} over {', '.join(map(str, args))}"


def cells(shown: AttributionTensors) -> str:
    """What one cell of `shown` holds, from its recorded aggregations."""
    done = _aggregations(shown)
    parts = [_words(name, args) for name, args in done] or ["one score per token"]
    if shown.extra_dims:
        parts.append(f"still per {', '.join(shown.extra_dims)} (reduce them)")
    if not any(name in ("normalize", "rescale") for name, _ in done):
        parts.append("not normalised")
    return "cells: " + "; ".join(parts)


def baseline(out: AttributionTensors) -> str | None:
    """The baseline in words: `meta["baseline"]`, else the method's `baseline` argument."""
    if "baseline" in out.meta:
        return out.meta["baseline"]
    value = method_args(out).get("baseline")
    return None if value is None else str(value)


def title(out: AttributionTensors) -> str:
    """A heatmap's title: the method and the target function."""
    return f"{out.meta.get('method', 'attribution')}, target {out.meta.get('target_fn', 'unknown')}"


def completeness(conv: Convergence, out: AttributionTensors, row: int) -> str:
    """One caption line: which steps of row `row` did not converge, by which rule."""
    pts = conv.points[row]
    head = "completeness" + (f", {pts} point{'s' * (pts != '1')}" if pts else "")
    rule = "" if conv.recorded else " (no completeness record: delta against the step score)"
    bad = unconverged(conv, out, row)
    if not bad:
        return f"{head}: every step has |delta| <= {conv.bound}{rule}"

    def step(k: int) -> str:
        pos, err = int(out.steps[k]), conv.error.get((row, k))
        share = "" if err is None else f" ({err:.0%})" if err >= 0.1 else f" ({err:.1%})"
        return f"{pos} {out.target_tokens[row][pos]!r}{share}"

    steps = f"step {step(bad[0])} has" if len(bad) == 1 else f"steps {', '.join(map(step, bad))} have"
    return f"{head}: {FLAG} {steps} |delta| > {conv.bound}{rule}{_remedy(out)}"


def _remedy(out: AttributionTensors) -> str:
    """For IG and layer IG on a fixed rule's refinement: the option that met the tolerance on
    more steps for less work on SmolLM2 (docs/benchmarks.md, "IG at equal accuracy")."""
    args = method_args(out)
    used = read_meta(out, "completeness", {})
    used = used.get("rule", args.get("method")) if isinstance(used, dict) else args.get("method")
    if (out.meta.get("method") not in ("integrated_gradients", "layer_integrated_gradients")
            or args.get("n_steps") != "auto" or used in ("adaptive", "auto")):
        return ""
    return "; try method='adaptive'"


def conservation(out: AttributionTensors, row: int) -> str | None:
    """One caption line for LRP (`meta["conservation"]`): the relevance sum against the target's
    value over row `row`'s steps, and the share absorbed (biases, softmax rule, epsilon)."""
    rec = read_meta(out, "conservation", None)
    if not isinstance(rec, dict):
        return None
    try:
        pairs = [(float(s), float(v)) for s, v in zip(rec["relevance_sum"][row], rec["target_value"][row])
                 if s is not None and v is not None]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not pairs:
        return None
    total, value = sum(s for s, _ in pairs), sum(v for _, v in pairs)
    shares = [(v - s) / v for s, v in pairs if v != 0]
    worst = max(shares, key=abs) if shares else math.nan
    what = rec.get("target", "target")
    return (f"conservation: relevance sums to {total:.4g} against {what} {value:.4g} over "
            f"{len(pairs)} step{'s' * (len(pairs) != 1)}; absorbed (biases, softmax rule, epsilon): "
            f"{(value - total) / value if value else math.nan:.1%} overall, at most {worst:.1%} in a step")


def notes(out: AttributionTensors, shown: AttributionTensors, row: int,
          conv: Convergence | None) -> list[str]:
    """Caption lines for batch row `row` of `out` drawn as `shown`: baseline, what a cell holds,
    completeness (`conv = convergence(out)`)."""
    lines = [] if (base := baseline(out)) is None else [f"baseline: {base}"]
    lines.append(cells(shown))
    if conv is not None:
        lines.append(completeness(conv, out, row))
    if (kept := conservation(out, row)) is not None:
        lines.append(kept)
    return lines


# ---- the matrix ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Heatmap:
    """One batch row as a matrix: `values[i, k]` scores row token i for column (step) k.

    `values` is NaN where the row token is not visible to the step (a later target token).
    `step_scores[name][k]` holds the step score of column k. `notes` are caption lines (what a
    cell holds, baseline, completeness); `flagged` lists the columns whose step did not converge.
    """

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    values: Tensor
    step_scores: dict[str, Tensor]
    n_source: int
    title: str
    notes: tuple[str, ...] = ()
    flagged: tuple[int, ...] = ()

    @property
    def signed(self) -> bool:
        finite = self.values[~self.values.isnan()]
        return bool((finite < 0).any())

    @property
    def vmax(self) -> float:
        finite = self.values[~self.values.isnan()].abs()
        return float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0

    def header(self, k: int) -> str:
        """Column k's label, marked when its step did not converge."""
        return f"{FLAG} {self.cols[k]}" if k in self.flagged else self.cols[k]


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible(text: str) -> str:
    """`text` with control characters (and line separators) written as escapes: data, never
    terminal commands."""
    return "".join(_ESCAPES.get(c) or (repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp")
                                       else c) for c in text)


def label(token: str) -> str:
    """A printable label for a decoded token: whitespace and control characters made visible,
    never empty."""
    text = visible(token)
    if not text.strip():
        return repr(token)[1:-1].replace(" ", "\u2423") or "''"
    return text


def template_positions(out: AttributionTensors, row: int) -> list[int]:
    """Source positions of row `row` that a chat template wrote and no method attributes
    (`meta["template"]`, recorded by `prepare(chat=True)` runs); [] without chat."""
    rows = json.loads(out.meta.get("template", "[]"))
    return rows[row] if row < len(rows) else []


def heatmap(
    out: AttributionTensors, *, row: int = 0, reduction: str | Reducer | None = None,
    normalize: bool = False, group_by: str | bool | Callable | None = None,
    show_template: bool = False,
) -> Heatmap:
    """The matrix of batch row `row` of `out`, padding removed, `*extra` dims reduced
    (`view`), with its title, caption lines and flagged columns. A chat run's template tokens
    (role headers, markers; never attributed) are left out unless `show_template`."""
    if not 0 <= row < out.source.shape[0]:
        n = out.source.shape[0]
        raise ValueError(f"`row`={row} is outside the batch of {n}: use 0..{n - 1}.")
    shown = view(out, reduction=reduction, normalize=normalize, group_by=group_by)
    cols = shown.step_mask[row].nonzero().squeeze(1)
    steps = shown.steps[cols]
    src = shown.source_mask[row].nonzero().squeeze(1)
    hide = [] if show_template or group_by not in (None, False) else template_positions(out, row)
    if hide:
        src = src[~torch.isin(src, torch.tensor(hide, dtype=src.dtype))]
    parts = [shown.source[row][cols][:, src].T.double()]
    labels = [shown.source_tokens[row][i] for i in src.tolist()]
    if shown.target is not None and len(steps):
        last = int(steps.max())
        visible_to_last = torch.arange(shown.target_mask.shape[1]) < last
        tgt = (shown.target_mask[row] & visible_to_last).nonzero().squeeze(1)
        block = shown.target[row][cols][:, tgt].T.double()
        block[tgt[:, None] >= steps[None, :]] = math.nan
        parts.append(block)
        labels += [shown.target_tokens[row][j] for j in tgt.tolist()]
    heading = title(out) + (f" (row {row})" if out.source.shape[0] > 1 else "")
    conv = convergence(out)
    bad = set(unconverged(conv, out, row))
    return Heatmap(
        rows=tuple(label(t) for t in labels),
        cols=tuple(label(shown.target_tokens[row][int(s)]) for s in steps.tolist()),
        values=torch.cat(parts), n_source=len(src), title=visible(heading),
        step_scores=_step_rows(out, row, cols),
        notes=tuple(visible(n) for n in [*notes(out, shown, row, conv), *(
            [f"{len(hide)} chat-template tokens hidden (show_template=True, --show-template "
             "shows them)"] if hide else [])]),
        flagged=tuple(i for i, k in enumerate(cols.tolist()) if k in bad),
    )


def _step_rows(out: AttributionTensors, row: int, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step scores, then the completeness error where the method has one (IG: sum of scores
    minus f(input) - f(baseline); large values mean more `n_steps` are needed). Taken from `out`
    before any normalisation, in the target function's units."""
    rows = {k: v[row][cols].double() for k, v in out.step_scores.items()}
    if out.delta is not None:
        rows["delta"] = out.delta[row][cols].double()
    return rows


def heatmaps(out: AttributionTensors, **options) -> list[Heatmap]:
    """`heatmap` of every batch row; `options`: `reduction`, `normalize`, `group_by`."""
    return [heatmap(out, row=r, **options) for r in range(out.source.shape[0])]


def step_score(out: AttributionTensors, hm: Heatmap, name: str | None = None) -> tuple[str, Tensor]:
    """(name, values per column of `hm`) of the step score `name`; by default the attributed
    target function's (`meta["target_fn"]`), else the only one there is."""
    scores = {k: v for k, v in hm.step_scores.items() if k != "delta"}
    if name is None:
        name = out.meta.get("target_fn")
        if name not in scores and len(scores) == 1:
            name = next(iter(scores))
    if name not in scores:
        have = ", ".join(map(repr, scores)) or "none"
        raise ValueError(f"the result has no step score {name!r} (it has {have}): pass `score=` "
                         "one of them, or attribute with `step_scores=[...]`.")
    return name, scores[name]


def top_tokens(hm: Heatmap, k: int) -> list[list[tuple[str, float]]]:
    """For each column of `hm`: the `k` (row label, score) pairs of largest |score| that the
    step can see, largest first (ties: earlier token first)."""
    if k < 1:
        raise ValueError(f"`top_k`={k}: label each step with at least 1 token.")
    tops = []
    for col in hm.values.T:
        seen = (~col.isnan()).nonzero().squeeze(1)
        order = col[seen].abs().argsort(descending=True, stable=True)[:k]
        tops.append([(hm.rows[int(seen[i])], float(col[seen[i]])) for i in order])
    return tops

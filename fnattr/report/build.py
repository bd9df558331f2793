"""What a report shows, gathered as plain data: the examples' index, and per example its panels
(one per method or file) and faithfulness figures.

Every panel comes from `fnattr.views.heatmap` (the extra dims reduced as the views reduce them,
`fnattr.views.view`), with the views' own title and caption lines, so the report says what the
terminal table and the PNG say. Tokens are passed as text (`views.visible`: control characters
written as escapes), never as markup: the page sets them with `textContent`.
"""

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fnattr.render import views
from fnattr.aggregate import Reducer
from fnattr.result import AttributionTensors

TOP = 3  # tokens of largest |score| that a row of the list names
SNIPPET = 200  # characters of an example's text that the list holds

# ColorBrewer RdBu (7 classes), blue (negative) - white - red (positive): diverging and readable
# by colour-blind readers. The page's script interpolates the same stops (report.js, STOPS).
STOPS = ((33, 102, 172), (103, 169, 207), (209, 229, 240), (247, 247, 247), (253, 219, 199),
         (239, 138, 98), (178, 24, 43))


def colour(value: float, vmax: float, *, signed: bool) -> tuple[int, int, int]:
    """The background of a token scoring `value` on a panel whose largest |score| is `vmax`:
    `STOPS` interpolated linearly over [-vmax, vmax] (unsigned scores: the white-red half)."""
    x = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    if not signed:
        x = max(x, 0.0)
    t = (x + 1) / 2 * (len(STOPS) - 1)
    i = min(int(math.floor(t)), len(STOPS) - 2)
    f = t - i
    return tuple(round(a * (1 - f) + b * f) for a, b in zip(STOPS[i], STOPS[i + 1]))


def _luminance(rgb: Sequence[int]) -> float:
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = map(channel, rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def ink(rgb: Sequence[int]) -> str:
    """Black or white text, whichever contrasts more with `rgb` (WCAG contrast ratio)."""
    lum = _luminance(rgb)
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#ffffff"


def _number(value: float) -> float | str | None:
    """A score as JSON: 6 significant digits; NaN and infinities as strings (JSON has none)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(f"{value:.6g}")


def _text(token: str) -> str:
    """A token as running text: control characters as escapes, never empty."""
    return views.visible(token) or views.label(token)


def _scale(vmax: float) -> int:
    e = math.floor(math.log10(vmax)) if vmax > 0 else 0
    return 0 if -1 <= e <= 2 else e


# ---- one attribution: a panel ----------------------------------------------------------------

def panel(out: AttributionTensors, row: int, *, name: str | None = None,
          reduction: str | Reducer | None = None, normalize: bool = False) -> dict[str, Any]:
    """Batch row `row` of `out` as the page draws it: running text (source, then target tokens,
    each with its heatmap row and column), the heatmap's values by column, step scores, title
    and caption lines (`views.heatmap`, with `reduction` and `normalize`)."""
    return _panel(views.view(out, reduction=reduction), row, name=name, normalize=normalize)


def _panel(out: AttributionTensors, row: int, *, name: str | None, normalize: bool) -> dict[str, Any]:
    """`panel` of an `out` whose extra dims are reduced already (`views.view`: done once for
    every row of a batch; the heatmap's own reduction is then a no-op, its caption the same)."""
    from fnattr.render import hidden

    hm = views.heatmap(out, row=row, normalize=normalize)
    hide = hidden(out, hm, row)
    src = out.source_mask[row].nonzero().squeeze(1).tolist()
    cols = out.step_mask[row].nonzero().squeeze(1)
    steps = out.steps[cols].tolist()
    tgt_rows: list[int] = []
    if out.target is not None and steps:
        seen = out.target_mask[row] & (torch.arange(out.target_mask.shape[1]) < max(steps))
        tgt_rows = seen.nonzero().squeeze(1).tolist()
    assert len(src) + len(tgt_rows) == len(hm.rows) and len(steps) == len(hm.cols)
    row_of = {j: len(src) + i for i, j in enumerate(tgt_rows)}
    col_of = {pos: k for k, pos in enumerate(steps)}
    toks = out.target_tokens[row]
    gen = [[_text(toks[j]), row_of.get(j, -1), col_of.get(j, -1), "\n" in toks[j]]
           for j in out.target_mask[row].nonzero().squeeze(1).tolist()]
    source = [[_text(out.source_tokens[row][i]), n, "\n" in out.source_tokens[row][i]]
              for n, i in enumerate(src)]
    values = [[None if hide[i, k] else _number(float(hm.values[i, k])) for i in range(len(hm.rows))]
              for k in range(len(hm.cols))]
    finite = hm.values[hm.values.isfinite()].abs()
    vmax = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
    try:
        score = views.step_score(out, hm)[0]
    except ValueError:
        score = None
    return {
        "name": name or out.meta.get("method", "attribution"), "title": views.visible(views.title(out)),
        "notes": list(hm.notes), "flagged": list(hm.flagged), "flag": views.FLAG,
        "source": source, "gen": gen, "rows": list(hm.rows), "cols": list(hm.cols),
        "pos": steps, "nsrc": hm.n_source, "values": values, "vmax": _number(vmax), "signed": hm.signed,
        "exp": _scale(vmax), "score": score,
        "scores": {k: [_number(float(x)) for x in v.tolist()] for k, v in hm.step_scores.items()},
    }


def top_tokens(p: Mapping[str, Any], k: int = TOP) -> list[list]:
    """The `k` heatmap rows of `p` of largest |score| over all its steps: [[label, score], ...]."""
    best: dict[int, float] = {}
    for col in p["values"]:
        for i, v in enumerate(col):
            if isinstance(v, (int, float)) and (i not in best or abs(v) > abs(best[i])):
                best[i] = v
    order = sorted(best, key=lambda i: (-abs(best[i]), i))[:k]
    return [[p["rows"][i], best[i]] for i in order]


def _example(key: Any, number: int, panels: list[dict], text: str, target: str,
             faith: dict | None = None) -> tuple[dict, dict]:
    """(index entry, detail) of one example."""
    top = top_tokens(panels[0]) if panels else []
    entry = {"n": number, "id": key, "text": views.visible(text)[:SNIPPET],
             "target": views.visible(target)[:SNIPPET], "top": top,
             "topScore": abs(top[0][1]) if top else 0}
    detail = {"n": number, "id": key, "text": views.visible(text), "target": views.visible(target),
              "panels": panels, "faith": faith}
    return entry, detail


def _texts(out: AttributionTensors, row: int) -> tuple[str, str]:
    src = "".join(t for t, m in zip(out.source_tokens[row], out.source_mask[row].tolist()) if m)
    tgt = "".join(t for t, m in zip(out.target_tokens[row], out.target_mask[row].tolist()) if m)
    return src, tgt


# ---- the three kinds of input ----------------------------------------------------------------

def from_results(results: Mapping[str, AttributionTensors], *, faith: list[dict] | None = None,
                 **view: Any) -> tuple[list[dict], list[dict]]:
    """Examples of one or several results of the same batch (row b of each is example b), each
    result a panel named by its key."""
    rows = {name: out.source.shape[0] for name, out in results.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the results hold different numbers of examples ({rows}): give results "
                         "of the same batch, one row per example in each.")
    first = next(iter(results.values()))
    shown = {name: views.view(out, reduction=view.get("reduction")) for name, out in results.items()}
    index, details = [], []
    for b in range(first.source.shape[0]):
        texts = {name: _texts(out, b) for name, out in results.items()}
        if len(set(texts.values())) > 1:
            raise ValueError(f"row {b} holds other texts in different results "
                             f"({', '.join(f'{n}: {t[0][:40]!r}' for n, t in texts.items())}): give "
                             "results of the same examples, in the same order.")
        panels = [_panel(out, b, name=name, normalize=view.get("normalize", False))
                  for name, out in shown.items()]
        e, d = _example(b, b, panels, *_texts(first, b), faith=None if faith is None else faith[b])
        index.append(e)
        details.append(d)
    return index, details


def from_run(folder: str | os.PathLike, **view: Any) -> tuple[list[dict], list[dict], list[str]]:
    """Examples of a dataset run folder (`fnattr attribute-dataset --out`), and its summary."""
    from fnattr import dataset
    from fnattr.result import load

    s = dataset.summary(folder)
    index, details = [], []
    for path in s.shards:
        out = load(path)
        start, keys = int(out.meta["dataset_start"]), dataset.ids(out)
        shown = views.view(out, reduction=view.get("reduction"))
        for r in range(out.source.shape[0]):
            key = start + r if keys is None else keys[r]
            p = _panel(shown, r, name=None, normalize=view.get("normalize", False))
            e, d = _example(key, start + r, [p], *_texts(out, r))
            index.append(e)
            details.append(d)
    lines = [views.visible(line) for line in dataset.describe(folder).split("\n")]
    return index, details, lines


def _curve(values: torch.Tensor, mask: torch.Tensor) -> list:
    """The mean over an example's real steps of per-step curves `[step level]`."""
    m = mask.to(values)
    return [_number(float(x)) for x in (values * m[:, None]).sum(0) / m.sum().clamp(min=1)]


def faith_figures(comp: Any) -> tuple[list[dict], dict]:
    """Per example: each method's area per metric with chance, its deletion and insertion curves,
    and the score per step; and the overall estimates (mean, 95 % interval, ranking)."""
    per = []
    for i in range(len(comp.ids)):
        methods = {}
        for m in comp.methods:
            f = comp.results[m]
            mask = f.step_mask[i]
            curves = {}
            for name in ("deletion", "insertion"):
                if getattr(f, name) is not None:
                    curves[name] = _curve(getattr(f, name)[i], mask)
                    if getattr(f, f"random_{name}") is not None:
                        curves[f"random_{name}"] = _curve(getattr(f, f"random_{name}").mean(0)[i], mask)
            methods[m] = {"metrics": {k: [_number(float(comp.per_example[m][k][i])),
                                          _number(float(comp.chance_per_example[m][k][i]))
                                          if k in comp.chance_per_example[m] else None]
                                      for k in comp.metrics},
                          "curves": curves, "score": [_number(float(x)) for x in f.score[i][mask]]}
        first = comp.results[comp.methods[0]]
        per.append({"methods": methods, "metrics": list(comp.metrics),
                    "levels": [float(x) for x in first.levels],
                    "target_fn": str(comp.meta.get("target_fn", "score")),
                    "higher": {k: bool(v) for k, v in _higher().items() if k in comp.metrics}})
    overall = {"metrics": list(comp.metrics), "higher": {k: _higher()[k] for k in comp.metrics},
               "ranking": {k: list(v) for k, v in comp.ranking.items()},
               "estimates": {m: {k: [_number(e.mean), _number(e.low), _number(e.high)]
                                 for k, e in comp.estimates[m].items()} for m in comp.methods},
               "chance": {m: {k: _number(e.mean) for k, e in comp.chance[m].items()}
                          for m in comp.methods},
               "notes": [views.visible(f"removal: {comp.meta.get('removal', '')}"),
                         views.visible(f"target: {comp.meta.get('target_fn', '')}; targets "
                                       f"{comp.meta.get('targets', '')}; ranking "
                                       f"{comp.meta.get('ranking', '')}, sign {comp.meta.get('sign', '')}"),
                         f"{len(comp.ids)} examples; 95% bootstrap intervals over examples "
                         f"({comp.n_boot} resamples); chance: {comp.meta.get('n_random', 0)} random rankings"]}
    return per, overall


def _higher() -> dict[str, bool]:
    from fnattr.evaluate import HIGHER_IS_BETTER
    return dict(HIGHER_IS_BETTER)


def from_comparison(comp: Any, results: Mapping[str, AttributionTensors] | None = None,
                    **view: Any) -> tuple[list[dict], list[dict], dict]:
    """Examples of an `fnattr evaluate` comparison, with the attributions of `results` (same
    examples, in the same order) as panels where given."""
    per, overall = faith_figures(comp)
    if results:
        n = {name: out.source.shape[0] for name, out in results.items()}
        if any(v != len(comp.ids) for v in n.values()):
            raise ValueError(f"the evaluation holds {len(comp.ids)} examples but the result files "
                             f"hold {n}: give results of the evaluated examples, in order.")
        index, details = from_results(results, faith=per, **view)
        return index, details, overall
    index, details = [], []
    for i, key in enumerate(comp.ids):
        e, d = _example(key, i, [], comp.sources[i], comp.targets[i], per[i])
        index.append(e)
        details.append(d)
    return index, details, overall


# ---- any input ---------------------------------------------------------------------------------

def _name(out: AttributionTensors, path: pathlib.Path | None, taken: set[str]) -> str:
    name = out.meta.get("method", "attribution")
    if name in taken:
        name = f"{name} ({path.name if path else len(taken)})"
    taken.add(name)
    return views.visible(name)


def kind(path: str | os.PathLike) -> str:
    """"result", "run" or "evaluate": what `path` holds (a missing or unknown path raises)."""
    from fnattr import dataset
    from fnattr.evaluate.compare import JSONL

    p = pathlib.Path(path)
    if p.is_file():
        return "result"
    if p.is_dir():
        if (p / JSONL).is_file():
            return "evaluate"
        if (p / dataset.RUN_FILE).is_file() or dataset.shards(p):
            return "run"
        raise ValueError(f"{str(p)!r} is a folder without a dataset run ({dataset.RUN_FILE}, shards) "
                         f"or an evaluation ({JSONL}): pass the --out of `fnattr attribute-dataset` "
                         "or of `fnattr evaluate`.")
    raise FileNotFoundError(f"{str(p)!r} does not exist: pass a result file (.safetensors), a "
                            "dataset run folder or an `fnattr evaluate` folder.")


def gather(inputs: Any, *, reduction: str | Reducer | None = None, normalize: bool = False,
           title: str | None = None) -> dict[str, Any]:
    """The report's data for `inputs`: an AttributionTensors, a path (result file, dataset run
    folder, evaluate folder), a `Comparison`, a {name: AttributionTensors} mapping, or a list of
    these (several result files side by side, with at most one evaluate folder or Comparison)."""
    from fnattr.evaluate.compare import Comparison
    from fnattr.evaluate.compare import load as load_comparison
    from fnattr.result import load

    view = {"reduction": reduction, "normalize": normalize}
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise ValueError("nothing to report: pass a result, a result file or a folder.")
    results: dict[str, AttributionTensors] = {}
    comp, run, taken, names = None, None, set(), []
    for item in items:
        if isinstance(item, AttributionTensors):
            results[_name(item, None, taken)] = item
        elif isinstance(item, Comparison):
            comp = item if comp is None else _twice("evaluations")
        elif isinstance(item, Mapping):
            for name, out in item.items():
                taken.add(name)
                results[views.visible(str(name))] = out
        elif isinstance(item, (str, os.PathLike)):
            what = kind(item)
            names.append(os.fspath(item))
            if what == "result":
                out = load(item)
                results[_name(out, pathlib.Path(item), taken)] = out
            elif what == "evaluate":
                comp = load_comparison(item) if comp is None else _twice("evaluate folders")
            else:
                run = item if run is None else _twice("dataset runs")
        else:
            raise TypeError(f"cannot report a {type(item).__name__}: pass an AttributionTensors, a "
                            "path, a Comparison, or a list of them.")
    if run is not None and (len(items) > 1):
        raise ValueError("a dataset run is reported on its own: pass its folder alone.")
    summary: list[str] = []
    overall = None
    if run is not None:
        index, details, summary = from_run(run, **view)
        what = "run"
    elif comp is not None:
        index, details, overall = from_comparison(comp, results or None, **view)
        what = "compare"
    else:
        index, details = from_results(results, **view)
        what = "compare" if len(results) > 1 else "result"
    heading = title or ("fnattr report: " + ", ".join(
        names or [", ".join(results) or "attribution"]))
    return {"kind": what, "title": views.visible(heading), "summary": summary, "overall": overall,
            "index": index, "details": details}


def _twice(what: str):
    raise ValueError(f"two {what} given: a report shows one (with any number of result files).")


def dumps(value: Any) -> str:
    """JSON that is safe inside a <script> element: `<`, `>`, `&` and U+2028/U+2029 escaped, so
    no data can close the element (`</script>`), open a comment (`<!--`) or end a line."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text

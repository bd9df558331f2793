"""Compare attribution methods by faithfulness on the same examples.

`compare_methods` prepares one batch (sources with forced targets, or generated ones), attributes
it with every method and scores each result with `fnattr.evaluate.faithfulness` under the same
removal, fractions, curve levels and random rankings. Per method and metric it keeps each
example's area (AOPC for comprehensiveness and sufficiency, AUC for the deletion and insertion
curves, averaged over the example's generated steps: `Faithfulness.per_example`), the random
rankings' area (chance), their mean and a 95 % percentile-bootstrap interval over examples (the
same seeded resamples for every method and metric: paired), and a ranking per metric
(`fnattr.evaluate.HIGHER_IS_BETTER` says which way is better).

>>> comp = compare_methods(model, tok, ["The capital of France is"], ["saliency", "occlusion"])
>>> comp.ranking["comprehensiveness"]; console(comp); comp.save("out"); plot_curves(comp, "c.png")
"""

import dataclasses
import inspect
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fnattr import defaults
from fnattr import evaluate as ev
from fnattr._check import typechecked
from fnattr.batch import Batch, prepare
from fnattr.dataset import Example
from fnattr.methods import METHODS
from fnattr.methods._common import fn_name
from fnattr.targets import TARGETS
from fnattr.types import Model, TargetFn

JSONL = "per_example.jsonl"
RESULT = "{}.faithfulness.safetensors"
LEVEL = 0.95  # the bootstrap interval's coverage


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over examples and its percentile-bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float


@typechecked
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Faithfulness of several methods on the same examples (`compare_methods`).

    - `per_example[method][metric]`: `[example]` areas; `chance_per_example`: the same for the
      random rankings (mean over the draws; empty without draws).
    - `estimates[method][metric]`, `chance[method][metric]`: `Estimate` (mean, bootstrap interval).
    - `ranking[metric]`: method names, best first. `results[method]`: the per-step `Faithfulness`.
    - `meta`: target, removal, fractions, curve levels, random draws, how targets were made.
    """

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    ids: tuple[int, ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    results: Mapping[str, ev.Faithfulness]
    per_example: Mapping[str, Mapping[str, Tensor]]
    chance_per_example: Mapping[str, Mapping[str, Tensor]]
    estimates: Mapping[str, Mapping[str, Estimate]]
    chance: Mapping[str, Mapping[str, Estimate]]
    ranking: Mapping[str, tuple[str, ...]]
    n_boot: int
    seed: int
    meta: Mapping[str, Any]

    def curve(self, method: str, name: str, *, random: bool = False) -> Tensor:
        """The mean `deletion` or `insertion` curve `[level]`: over each example's steps, then
        over examples (so its AUC is the mean of the per-example AUCs); `random`: chance's."""
        if name not in ("deletion", "insertion"):
            raise ValueError(f"`name`={name!r}: the curves are 'deletion' and 'insertion'.")
        faith = self.results[method]
        values = faith._get(name, random)
        values = values.mean(0) if random else values
        mask = faith.step_mask.to(values)
        per = (values * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
        return per.mean(0)

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[pathlib.Path]:
        """`save(self, out_dir, overwrite=overwrite)`."""
        return save(self, out_dir, overwrite=overwrite)

    def __repr__(self) -> str:
        return (f"Comparison(methods={list(self.methods)}, metrics={list(self.metrics)}, "
                f"examples={len(self.ids)}, n_boot={self.n_boot})")


# ---- checks before anything runs ------------------------------------------------------------

def _methods(methods: Sequence[str | Callable], options: Mapping[str, Mapping[str, Any]] | None,
             ) -> dict[str, tuple[Callable, dict[str, Any]]]:
    """{name: (method, its options)}, every name, option and file name checked."""
    plan: dict[str, tuple[Callable, dict[str, Any]]] = {}
    for spec in [methods] if isinstance(methods, str) or callable(methods) else methods:
        if isinstance(spec, str) and spec not in METHODS:
            raise ValueError(f"method {spec!r} is unknown: use one of {', '.join(sorted(METHODS))}.")
        fn = METHODS[spec] if isinstance(spec, str) else spec
        name = spec if isinstance(spec, str) else getattr(fn, "__name__", "")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name in plan:
            raise ValueError(f"method name {name!r} is " + ("given twice" if name in plan else
                             "not a plain file name") + ": each method needs its own name "
                             "(set the function's __name__).")
        plan[name] = (fn, {})
    if not plan:
        raise ValueError("`methods` is empty: name at least one, e.g. ['saliency', 'occlusion'].")
    for name, opts in (options or {}).items():
        if name not in plan:
            raise ValueError(f"`method_options` names {name!r}, which is not among the methods "
                             f"{list(plan)}.")
        params = inspect.signature(plan[name][0]).parameters
        allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "step_scores"]
        if unknown := [k for k in opts if k not in allowed]:
            raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}: "
                             f"its options are {', '.join(allowed) or 'none'}.")
        plan[name] = (plan[name][0], dict(opts))
    return plan


def _faithfulness_options(metrics: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(ev.faithfulness).parameters
    allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p not in ("metrics", "seed")]
    if unknown := [k for k in options if k not in allowed]:
        raise ValueError(f"unknown option {', '.join(map(repr, unknown))}: compare_methods passes "
                         f"{', '.join(allowed)} to fnattr.evaluate.faithfulness.")
    full = {p: options.get(p, params[p].default) for p in allowed}
    ev._check_options(metrics, full["fractions"], full["curve_levels"], full["removal"],
                      full["ranking"], full["sign"], full["n_random"], full["internal_batch_size"])
    return dict(options)


def _texts(examples: Sequence[str | Example | tuple[str, str | None]]):
    """(sources, targets or None) of `examples`."""
    pairs = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            pairs.append((ex, None))
        elif isinstance(ex, Example):
            pairs.append((ex.text, ex.target))
        elif isinstance(ex, tuple) and len(ex) == 2:
            pairs.append(ex)
        else:
            raise TypeError(f"`examples[{i}]` is {type(ex).__name__}: pass a text, a (source, "
                            "target) pair or a fnattr.dataset.Example.")
    forced = sum(t is not None for _, t in pairs)
    if 0 < forced < len(pairs):
        raise ValueError(f"{forced} of {len(pairs)} examples have a target: force a target for "
                         "every example, or for none (then they are generated).")
    return [s for s, _ in pairs], [t for _, t in pairs] if forced else None


def output_paths(out_dir: str | os.PathLike, methods: Sequence[str]) -> list[pathlib.Path]:
    """The files `save` writes into `out_dir`: the JSONL, then one safetensors file per method."""
    out = pathlib.Path(out_dir)
    return [out / JSONL, *(out / RESULT.format(m) for m in methods)]


def check_outputs(paths: Sequence[str | os.PathLike], *, overwrite: bool = False) -> None:
    """Raise unless every path can be written: its nearest existing folder is writable, and the
    file does not exist yet (or `overwrite`)."""
    for path in map(pathlib.Path, paths):
        if path.exists() and (path.is_dir() or not overwrite):
            raise FileExistsError(f"{str(path)!r} " + ("is a folder" if path.is_dir() else
                                  "exists: pass overwrite=True (--overwrite) to replace it") + ".")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write {str(path)!r}: {str(folder)!r} is not a "
                                  "writable folder.")


# ---- the comparison -------------------------------------------------------------------------

def bootstrap(values: Tensor, *, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """The mean of `values` `[example]` and its 95 % percentile-bootstrap interval: the 2.5 and
    97.5 percentiles of the means of `n_boot` resamples of the examples (with replacement), drawn
    by a `torch.Generator` seeded with `seed`, so the same n, `n_boot` and `seed` give the same
    resamples (paired across methods and metrics); the global generators are left alone."""
    values = values.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    means = values[torch.randint(len(values), (n_boot, len(values)), generator=gen)].mean(-1)
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return Estimate(float(values.mean()), low, high)


def _order(methods: Sequence[str], means: Mapping[str, float], higher: bool) -> tuple[str, ...]:
    return tuple(sorted(methods, key=lambda m: (math.isnan(means[m]), -means[m] if higher else means[m])))


def _build(results, *, ids, sources, targets, n_boot, seed, meta) -> Comparison:
    """The per-example numbers, estimates and rankings of per-method `results`."""
    methods, first = tuple(results), next(iter(results.values()))
    metrics = first.metrics
    per = {m: {k: f.per_example(k).double() for k in metrics} for m, f in results.items()}
    chance = {m: {k: f.per_example(k, random=True).double().mean(0) for k in metrics
                  if getattr(f, f"random_{k}") is not None} for m, f in results.items()}
    est = {m: {k: bootstrap(v, n_boot=n_boot, seed=seed) for k, v in d.items()} for m, d in per.items()}
    est_chance = {m: {k: bootstrap(v, n_boot=n_boot, seed=seed) for k, v in d.items()}
                  for m, d in chance.items()}
    ranking = {k: _order(methods, {m: est[m][k].mean for m in methods}, ev.HIGHER_IS_BETTER[k])
               for k in metrics}
    return Comparison(methods, metrics, tuple(ids), tuple(sources), tuple(targets), dict(results),
                      per, chance, est, est_chance, ranking, n_boot, seed, dict(meta))


@contextmanager
def _phase(console, message: str) -> Iterator[None]:
    """A status line on stderr while the work runs, and how long it took after it."""
    if console is None:
        yield
        return
    from rich.text import Text

    start = time.perf_counter()
    with console.status(Text(message)):
        yield
    console.print(Text(f"{message}: done in {time.perf_counter() - start:.1f} s", style="dim"))


def compare_methods(
    model: Model, tokenizer: PreTrainedTokenizerBase | None,
    examples: Batch | Sequence[str | Example | tuple[str, str | None]],
    methods: Sequence[str | Callable], *, target_fn: str | TargetFn = defaults.TARGET_FN,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] = ev.METRICS, max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    n_boot: int = 1000, seed: int = 0, progress: bool = False,
    out_dir: str | os.PathLike | None = None, overwrite: bool = False, **faithfulness_options: Any,
) -> Comparison:
    """Attribute the same examples with every method in `methods` (names from
    `fnattr.methods.METHODS`, or functions) and compare their faithfulness.

    `examples`: texts (targets generated, `max_new_tokens`), (source, target) pairs or
    `fnattr.dataset.Example`s (targets forced), or a prepared `Batch`; the batch is prepared
    once and every method runs on it. `method_options`: `{method: {option: value}}`.
    `target_fn`: a name from `fnattr.targets.TARGETS` or a function, for the methods and the
    scores. `faithfulness_options` (`fractions`, `curve_levels`, `removal`, `ranking`, `sign`,
    `reduction`, `n_random`, `internal_batch_size`) go to `fnattr.evaluate.faithfulness`, the same
    for every method. `seed` seeds its random rankings and the `n_boot` bootstrap resamples
    (local generators). `progress`: status lines on stderr. `out_dir`: write each method's
    result as soon as it exists, and the JSONL at the end (`save`; checked before anything runs).

    >>> comp = compare_methods(model, tok, [("The capital of France is", " Paris")],
    ...                        ["saliency", "occlusion"], fractions=(0.1, 0.2), n_random=10)
    >>> comp.estimates["saliency"]["comprehensiveness"]   # Estimate(mean=..., low=..., high=...)
    """
    plan = _methods(methods, method_options)
    fn = target_fn if callable(target_fn) else TARGETS.get(target_fn)
    if fn is None:
        raise ValueError(f"`target_fn`={target_fn!r} is unknown: use one of {sorted(TARGETS)} or "
                         "pass a function.")
    metrics = tuple(metrics)
    options = _faithfulness_options(metrics, faithfulness_options)
    for name, value, low in (("n_boot", n_boot, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}`={value!r}: it must be an integer of at least {low}.")
    if out_dir is not None:
        check_outputs(output_paths(out_dir, list(plan)), overwrite=overwrite)
    console = None
    if progress:
        from rich.console import Console
        console = Console(stderr=True)
    how = "from the batch"
    if not isinstance(examples, Batch):
        sources, targets = _texts(examples)
        how = "forced" if targets is not None else f"generated (greedy, at most {max_new_tokens} tokens)"
        with _phase(console, f"preparing {len(sources)} examples"):
            examples = prepare(model, tokenizer, sources, targets, max_new_tokens=max_new_tokens)
    batch, results = examples, {}
    meta = {"target_fn": fn_name(fn), "targets": how,
            "options": json.loads(json.dumps({**options, "seed": seed}, default=repr))}
    files = dict(zip(plan, output_paths(out_dir, list(plan))[1:])) if out_dir is not None else {}
    for name, (method, opts) in plan.items():
        with _phase(console, f"attributing with {name}"):
            out = method(model, batch, fn, **opts)
        with _phase(console, f"scoring {name}"):
            results[name] = ev.faithfulness(model, batch, out, fn, metrics=metrics, seed=seed,
                                            **options)
        if name in files:
            header = _header(list(plan), range(len(batch)), n_boot, seed, meta)
            _write_result(results[name], files[name], header)
    comp = _build(results, ids=range(len(batch)), sources=batch.sources, targets=batch.targets,
                  n_boot=n_boot, seed=seed, meta={**meta, **_faith_meta(results)})
    if out_dir is not None:
        _write_jsonl(comp, output_paths(out_dir, [])[0])
    return comp


def _faith_meta(results: Mapping[str, ev.Faithfulness]) -> dict[str, Any]:
    first = next(iter(results.values()))
    draws = [getattr(first, f"random_{k}") for k in first.metrics]
    return {"removal": first.meta.get("removal", ""), "removal_kind": first.meta.get("removal_kind", ""),
            "fractions": first.fractions.tolist(), "curve_levels": len(first.levels) - 1,
            "n_random": len(draws[0]) if draws[0] is not None else 0,
            "ranking": first.meta.get("ranking", ""), "sign": first.meta.get("sign", ""),
            "reduction": {m: f.meta.get("reduction", "") for m, f in results.items()}}


# ---- files ----------------------------------------------------------------------------------

def _header(methods: Sequence[str], ids: Sequence[int], n_boot: int, seed: int,
            meta: Mapping[str, Any]) -> str:
    """What `load` needs besides the JSONL, stored in each result file's metadata."""
    keep = {k: meta[k] for k in ("target_fn", "targets", "options")}
    return json.dumps({"methods": list(methods), "ids": list(ids), "n_boot": n_boot, "seed": seed,
                       "meta": keep}, default=repr)


def _write_result(faith: ev.Faithfulness, path: pathlib.Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    ev.save(dataclasses.replace(faith, meta={**faith.meta, "comparison": header}), tmp)
    os.replace(tmp, path)


def _write_jsonl(comp: Comparison, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w", encoding="utf-8") as f:
        for i, (ex_id, src, tgt) in enumerate(zip(comp.ids, comp.sources, comp.targets)):
            for m in comp.methods:
                row = {"id": ex_id, "source": src, "target": tgt, "method": m,
                       "steps": int(comp.results[m].step_mask[i].sum())}
                for k in comp.metrics:
                    row[k] = float(comp.per_example[m][k][i])
                    if k in comp.chance_per_example[m]:
                        row[f"random_{k}"] = float(comp.chance_per_example[m][k][i])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save(comp: Comparison, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[pathlib.Path]:
    """Write `out_dir/per_example.jsonl` (one line per (example, method): id, source, target,
    every metric's area and its random baseline `random_<metric>`) and
    `out_dir/<method>.faithfulness.safetensors` (the per-step `Faithfulness`). Refuses to
    replace an existing file unless `overwrite`; checks every path before writing any.
    Returns the paths written."""
    paths = output_paths(out_dir, comp.methods)
    check_outputs(paths, overwrite=overwrite)
    header = _header(comp.methods, comp.ids, comp.n_boot, comp.seed, comp.meta)
    for m, path in zip(comp.methods, paths[1:]):
        _write_result(comp.results[m], path, header)
    _write_jsonl(comp, paths[0])
    return paths


def load(out_dir: str | os.PathLike) -> Comparison:
    """Read a comparison written by `save` (or `compare_methods(out_dir=...)`)."""
    jsonl = pathlib.Path(out_dir) / JSONL
    if not jsonl.is_file():
        raise FileNotFoundError(f"{str(jsonl)!r} does not exist: pass a folder written by "
                                "Comparison.save or `fnattr evaluate --out`.")
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line]
    results, header = {}, {}
    for m in dict.fromkeys(r["method"] for r in rows):
        faith = ev.load(output_paths(out_dir, [m])[1])
        header = json.loads(faith.meta["comparison"])
        meta = {k: v for k, v in faith.meta.items() if k != "comparison"}
        results[m] = dataclasses.replace(faith, meta=meta)
    texts = {r["id"]: (r["source"], r["target"]) for r in rows}
    ids = header["ids"]
    return _build(results, ids=ids, sources=[texts[i][0] for i in ids],
                  targets=[texts[i][1] for i in ids], n_boot=header["n_boot"], seed=header["seed"],
                  meta={**header["meta"], **_faith_meta(results)})


# ---- views ----------------------------------------------------------------------------------

def _chance_rows(comp: Comparison, metrics: Sequence[str]) -> list[str]:
    """The methods whose chance level to show: the first alone where every method's random
    rankings scored the same (they do when the methods can lose the same tokens), else each."""
    have = [m for m in comp.methods if all(k in comp.chance_per_example[m] for k in metrics)]
    same = all(torch.allclose(comp.chance_per_example[m][k], comp.chance_per_example[have[0]][k],
                              rtol=1e-9, atol=1e-12) for m in have for k in metrics)
    return have[:1] if same else have


def _cell(e: Estimate) -> str:
    return f"{e.mean:.3g} [{e.low:.3g}, {e.high:.3g}]"


def _caption(comp: Comparison, by: str) -> list[str]:
    m = comp.meta
    up = [k for k in comp.metrics if ev.HIGHER_IS_BETTER[k]]
    down = [k for k in comp.metrics if not ev.HIGHER_IS_BETTER[k]]
    fractions = ", ".join(f"{q:g}" for q in m["fractions"])
    reductions = ", ".join(f"{k} {v}" for k, v in m["reduction"].items())
    better = [*(["\u2191 higher is better: " + ", ".join(up)] if up else []),
              *(["\u2193 lower is better: " + ", ".join(down)] if down else [])]
    aopc = [k for k in comp.metrics if k in ("comprehensiveness", "sufficiency")]
    auc = [k for k in comp.metrics if k in ("deletion", "insertion")]
    areas = [*([f"AOPC (mean over fractions {fractions}) for {' and '.join(aopc)}"] if aopc else []),
             *([f"AUC over {m['curve_levels'] + 1} levels (0 to 1) of the {' and '.join(auc)} "
                "curve" + "s" * (len(auc) > 1)] if auc else [])]
    lines = [
        f"per example: {', '.join(areas)}, averaged over the example's generated steps",
        (f"cells: mean over {len(comp.ids)} examples [{LEVEL:.0%} percentile bootstrap interval, "
         f"{comp.n_boot} resamples, seed {comp.seed}]; ranked by {by}"),
        (f"target: {m['target_fn']}; targets {m['targets']}; removal: {m['removal']}; tokens "
         f"ranked per {m['ranking']} by the {m['sign']} score, extra dims reduced by {reductions}"),
        "; ".join(better),
    ]
    if m["n_random"]:
        lines.append(f"chance: {m['n_random']} random ranking{'s' * (m['n_random'] > 1)}, "
                     "the same metrics")
    return lines


def table(comp: Comparison, *, by: str | None = None):
    """A rich table of `comp`, best first by metric `by` (default: the first metric): per metric
    the mean and [low, high], then the chance level; the caption says what the numbers are.
    Every text is a rich `Text`, never markup."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    by = comp.metrics[0] if by is None else by
    if by not in comp.metrics:
        raise ValueError(f"`by`={by!r}: rank by one of {list(comp.metrics)}.")
    n = len(comp.methods)
    grid = Table(title=Text(f"faithfulness of {n} method{'s' * (n > 1)}, ranked by {by}",
                            style="bold"), pad_edge=False)
    grid.add_column(Text("#"), justify="right")
    grid.add_column(Text("method"), no_wrap=True)
    for k in comp.metrics:
        grid.add_column(Text(f"{k} {'↑' if ev.HIGHER_IS_BETTER[k] else '↓'}"), justify="right",
                        no_wrap=True)
    for rank, m in enumerate(comp.ranking[by], 1):
        grid.add_row(Text(str(rank)), Text(m, style="bold" if rank == 1 else ""),
                     *(Text(_cell(comp.estimates[m][k])) for k in comp.metrics),
                     end_section=rank == len(comp.methods))
    chance = _chance_rows(comp, comp.metrics)
    for m in chance:
        name = "chance" if len(chance) == 1 else f"chance ({m})"
        grid.add_row(Text("-"), Text(name, style="italic"),
                     *(Text(_cell(comp.chance[m][k]) if k in comp.chance[m] else "", style="dim")
                       for k in comp.metrics))
    return Group(grid, *(Text(line, style="dim") for line in _caption(comp, by)))


def console(comp: Comparison, *, by: str | None = None, file=None, width: int | None = None) -> None:
    """Print `table(comp, by=by)` (to `file`, default stdout; a pipe gets full-width lines)."""
    from rich.console import Console

    file = file or sys.stdout
    if width is None and not (hasattr(file, "isatty") and file.isatty()):
        width = 1000
    Console(file=file, width=width).print(table(comp, by=by))


def plot_curves(comp: Comparison, path: str | os.PathLike, *, overwrite: bool = False,
                dpi: int = 100):
    """Write a PNG of the mean deletion and insertion curves (`Comparison.curve`): two panels,
    fraction on x, the target on y, one line per method, the random rankings dashed. Every text
    is drawn literally (mathtext and TeX off). Returns the matplotlib Figure."""
    missing = [k for k in ("deletion", "insertion") if k not in comp.metrics]
    if missing:
        raise ValueError(f"`comp` holds no {' or '.join(missing)} curve: compare with those metrics.")
    check_outputs([path], overwrite=overwrite)
    import matplotlib  # and no pyplot: no GUI backend, no global figure state
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig = Figure(figsize=(11, 4.8), dpi=dpi, layout="constrained")
        colours = matplotlib.colormaps["tab10"]
        for ax, name in zip(fig.subplots(1, 2), ("deletion", "insertion")):
            x = comp.results[comp.methods[0]].levels.numpy()
            for i, m in enumerate(comp.methods):
                ax.plot(x, comp.curve(m, name).numpy(), color=colours(i % 10),
                        label=f"{m} (AUC {comp.estimates[m][name].mean:.3g})")
            chance = _chance_rows(comp, (name,))
            same = len(chance) == 1
            for m in chance:
                ax.plot(x, comp.curve(m, name, random=True).numpy(), linestyle="--",
                        color="grey" if same else colours(comp.methods.index(m) % 10),
                        label="random ranking" if same else f"random ranking ({m})")
            better = "higher" if ev.HIGHER_IS_BETTER[name] else "lower"
            ax.set_title(f"{name} ({better} AUC is better)")
            ax.set_xlabel("fraction of tokens " + ("removed" if name == "deletion" else "inserted")
                          + ", highest-ranked first")
            ax.set_ylabel(f"{comp.meta['target_fn']} (mean over steps, then examples)")
            ax.legend(fontsize=8)
        fig.suptitle(f"{len(comp.ids)} examples; removal: {comp.meta['removal']}", fontsize=10)
        for text in fig.findobj(Text):
            text.set_parse_math(False)
            text.set_usetex(False)
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(os.fspath(path), dpi=dpi, format="png")
    return fig

"""`Comparison` and `Estimate`: the result of `fnattr.compare`, its bootstrap and rankings, and
its files (the per-example JSONL and one `Faithfulness` per method)."""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fnattr._check import typechecked
from fnattr.evaluate import metrics as ev

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


def _faith_meta(results: Mapping[str, ev.Faithfulness]) -> dict[str, Any]:
    first = next(iter(results.values()))
    draws = [getattr(first, f"random_{k}") for k in first.metrics]
    return {"removal": first.meta.get("removal", ""), "removal_kind": first.meta.get("removal_kind", ""),
            "fractions": first.fractions.tolist(), "curve_levels": len(first.levels) - 1,
            "n_random": len(draws[0]) if draws[0] is not None else 0,
            "ranking": first.meta.get("ranking", ""), "sign": first.meta.get("sign", ""),
            "reduction": {m: f.meta.get("reduction", "") for m, f in results.items()}}


# ---- files: the per-example JSONL and one `Faithfulness` per method ----------------------------

JSONL = "per_example.jsonl"
RESULT = "{}.faithfulness.safetensors"


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

"""Files of `fnattr.compare`: the per-example JSONL and one `Faithfulness` per method."""

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from fnattr.evaluate import metrics as ev
from fnattr.evaluate.compare_result import Comparison, _build, _faith_meta

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

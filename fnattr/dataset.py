"""Attribute a whole .jsonl / .csv dataset, one safetensors shard per batch, resumable.

Examples stream from the file: memory holds one batch, never the dataset. Each shard is written
to a temporary file and renamed, so an interrupted run leaves only complete shards; running the
same command again continues after the last one (no example lost or repeated).
"""

import csv
import dataclasses
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from fnattr.batch import prepare
from fnattr.result import AttributionTensors, load
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

SHARD = "shard-{:06d}.safetensors"
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    target: str | None = None


def _records(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a .jsonl or .csv file, streamed."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{n} is not valid JSON ({error.msg}).") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{n} is not a JSON object: write one object per line.")
                    yield n, record
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            for n, record in enumerate(csv.DictReader(f), 2):
                yield n, record
    else:
        raise ValueError(f"--input {str(path)!r} is neither .jsonl nor .csv: convert it to one of them.")


def read_examples(
    path: str | os.PathLike, *, text_field: str, target_field: str | None = None
) -> Iterator[Example]:
    """Stream the examples of `path`; a missing field is reported with the fields that exist."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist: pass a .jsonl or .csv file.")
    records = _records(path)  # validates the suffix before the first record is asked for
    first = next(records, None)
    if first is None:
        raise ValueError(f"--input {str(path)!r} holds no examples.")
    for flag, field in (("--text-field", text_field), ("--target-field", target_field)):
        if field is not None and field not in first[1]:
            raise ValueError(f"{flag} {field!r} is not a field of {str(path)!r}: its fields are "
                             f"{', '.join(map(repr, first[1]))}.")
    return _examples(path, itertools.chain([first], records), text_field, target_field)


def _examples(path, records, text_field, target_field) -> Iterator[Example]:
    for n, record in records:
        values = []
        for field in (text_field, target_field):
            value = None if field is None else record.get(field)
            if field is not None and not isinstance(value, str):
                raise ValueError(f"{path}:{n} has no text in field {field!r} (got {value!r}).")
            values.append(value)
        yield Example(*values)


def count_examples(path: str | os.PathLike) -> int:
    """Number of records in `path`, by one streaming pass (for the progress bar's ETA)."""
    return sum(1 for _ in _records(pathlib.Path(path)))


def shards(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The complete shards of a run, in order."""
    return sorted(pathlib.Path(out_dir).glob("shard-*.safetensors"))


def load_shards(out_dir: str | os.PathLike) -> Iterator[AttributionTensors]:
    """The results of a run, one shard (one batch) at a time."""
    for path in shards(out_dir):
        yield load(path)


def _resume(out_dir: pathlib.Path, config: dict[str, Any]) -> tuple[int, int]:
    """(examples done, shards done) of an earlier run in `out_dir`, after checking its config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        earlier = json.loads(run_file.read_text())
        if earlier != config:
            changed = sorted(k for k in set(earlier) | set(config) if earlier.get(k) != config.get(k))
            raise ValueError(f"--out {str(out_dir)!r} holds a run with other settings "
                             f"({', '.join(changed)}): use a new folder, or the same settings to resume it.")
    else:
        run_file.write_text(json.dumps(config, indent=1))
    for tmp in out_dir.glob(".tmp-*"):
        tmp.unlink()
    done = 0
    found = shards(out_dir)
    for i, path in enumerate(found):
        if path.name != SHARD.format(i):
            raise ValueError(f"{str(out_dir)!r} is missing {SHARD.format(i)} (found {path.name}): "
                             "remove the shards after the gap and run again.")
        meta = load(path).meta
        if int(meta["dataset_start"]) != done:
            raise ValueError(f"{path} starts at example {meta['dataset_start']}, expected {done}.")
        done = int(meta["dataset_end"])
    return done, len(found)


def _progress(total: int | None, done: int, enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("attributing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    from rich.console import Console

    bar = Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)
    task = bar.add_task("run", total=total, completed=done, rate="- ex/s")
    return bar, task


def run(
    model: Model, tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example],
    method: Callable, *, out_dir: str | os.PathLike, target_fn: TargetFn = probability,
    batch_size: int = 8, max_new_tokens: int = 8, step_scores: Sequence[str] = (),
    method_args: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
    total: int | None = None, progress: bool = True,
    on_shard: Callable[[pathlib.Path], None] | None = None,
) -> int:
    """Attribute `examples` in batches of `batch_size`, one shard per batch, into `out_dir`.

    Resumes after the shards already in `out_dir` when `config` (the run's settings, stored in
    `run.json`) matches. `on_shard(path)` is called after each shard is written.
    Returns the number of examples attributed in total (earlier runs included).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: it must be at least 1.")
    method_args = dict(method_args or {})
    settings = {"method": getattr(method, "__name__", repr(method)), "method_args": method_args,
                "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "step_scores": list(step_scores), "target_fn": getattr(target_fn, "__name__", ""),
                **(config or {})}
    out_dir = pathlib.Path(out_dir)
    done, index = _resume(out_dir, settings)
    stream = itertools.islice(iter(examples), done, None)
    bar, task = _progress(total, done, progress)
    start, fresh = time.perf_counter(), 0
    with bar:
        while chunk := list(itertools.islice(stream, batch_size)):
            targets = [e.target for e in chunk]
            batch = prepare(model, tokenizer, [e.text for e in chunk],
                            None if targets[0] is None else targets, max_new_tokens=max_new_tokens)
            out = method(model, batch, target_fn, step_scores=tuple(step_scores), **method_args)
            meta = {**out.meta, "dataset_start": str(done), "dataset_end": str(done + len(chunk))}
            path = out_dir / SHARD.format(index)
            tmp = out_dir / f".tmp-{path.name}"
            out.replace(meta=meta).save(tmp)
            os.replace(tmp, path)
            done, index, fresh = done + len(chunk), index + 1, fresh + len(chunk)
            rate = fresh / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.2f} ex/s")
            if on_shard is not None:
                on_shard(path)
    return done

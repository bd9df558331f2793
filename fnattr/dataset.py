"""Attribute a whole .jsonl / .csv dataset, one safetensors shard per batch, resumable.

Examples stream from the file: memory holds one batch, never the dataset. Each shard is written
to a temporary file and renamed, so an interrupted run leaves only complete shards; running the
same command again continues after the last one (no example lost or repeated). Each shard's
header records a SHA-256 of its input rows (text, target, id): a resumed run recomputes it from
the input and refuses an edited file instead of mixing two versions of it.

A shard is an ordinary result; its `meta` says which examples it holds:

>>> for out in load_shards("runs/facts"):          # one AttributionTensors per batch, in order
...     start, end = int(out.meta["dataset_start"]), int(out.meta["dataset_end"])
...     print(start, end, ids(out), out.source.shape)  # ids: the `id_field` values, or None
"""

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from fnattr import aggregate, defaults, views
from fnattr.aggregate import Reducer
from fnattr.batch import prepare
from fnattr.result import AttributionTensors, load, load_meta
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

SHARD = "shard-{:06d}.safetensors"
RUN_FILE = "run.json"
RUN_FORMAT = "fnattr.dataset/1"
ON_BAD_ROW = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class Example:
    """One input row: `text`, a forced `target` (None: generate), an `id` carried into the shard
    (None: none), and the file `line` it came from (a CSV row over several lines: its last; for
    messages, not part of equality)."""

    text: str
    target: str | None = None
    id: str | int | None = None
    line: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row of the input that holds no usable example, and why."""

    line: int
    reason: str


# ---- reading ---------------------------------------------------------------------------------

def _records(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record or why the line is no record) of a .jsonl or .csv file, streamed."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        yield n, f"not valid JSON ({error.msg})"
                        continue
                    yield n, record if isinstance(record, dict) else "not a JSON object"
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                yield reader.line_num, record
    else:
        raise ValueError(f"--input {str(path)!r} is neither .jsonl nor .csv: convert it to one of them.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "\u2026"


def _example(record: dict[str, Any], n: int, fields: tuple[str, str | None, str | None]) -> Example | str:
    """The example of one record, or why it has none."""
    text_field, target_field, id_field = fields
    values = []
    for field in (text_field, target_field):
        value = None if field is None else record.get(field)
        if field is not None and not (isinstance(value, str) and value.strip()):
            what = "is empty" if isinstance(value, str) else f"holds no text (got {_short(value)})"
            return f"field {field!r} {what}"
        values.append(value)
    key = None if id_field is None else record.get(id_field)
    if id_field is not None and (not isinstance(key, str | int) or isinstance(key, bool) or key == ""):
        return f"field {id_field!r} holds no id (got {_short(key)}): use a string or an integer"
    return Example(*values, id=key, line=n)


def _bad(path: pathlib.Path, n: int, why: str) -> ValueError:
    return ValueError(f"{path}:{n}: {why}: fix that line, or pass --on-bad-row skip to pass over it.")


class Examples(Iterator[Example]):
    """The examples of a file, streamed (`read_examples`); `skipped` lists the bad rows passed
    over so far when `on_bad_row="skip"`."""

    def __init__(self, path: pathlib.Path, records: Iterator, fields: tuple, on_bad_row: str) -> None:
        self.path = path
        self.skipped: list[BadRow] = []
        self._rows = self._examples(records, fields, on_bad_row)

    def _examples(self, records, fields, on_bad_row) -> Iterator[Example]:
        for n, record in records:
            got = record if isinstance(record, str) else _example(record, n, fields)
            if isinstance(got, Example):
                yield got
            elif on_bad_row == "skip":
                self.skipped.append(BadRow(n, got))
            else:
                raise _bad(self.path, n, got)

    def __next__(self) -> Example:
        return next(self._rows)


def read_examples(
    path: str | os.PathLike, *, text_field: str, target_field: str | None = None,
    id_field: str | None = None, on_bad_row: str = "stop",
) -> Examples:
    """Stream the examples of `path`; a missing field is reported with the fields that exist.

    A row without usable text (empty, not a string, not JSON), target or id stops the stream
    with an error naming its file line (`on_bad_row="stop"`), or is passed over and listed in
    `.skipped` (`"skip"`; a dataset run records those lines in its `run.json`)."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"--on-bad-row {on_bad_row!r}: use one of {', '.join(ON_BAD_ROW)}.")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist: pass a .jsonl or .csv file.")
    records = _records(path)  # validates the suffix before the first record is asked for
    head: list[tuple[int, Any]] = []  # rows up to the first record: its fields are checked here
    for n, record in records:
        head.append((n, record))
        if isinstance(record, dict):
            break
        if on_bad_row == "stop":
            raise _bad(path, n, record)
    if not head or not isinstance(head[-1][1], dict):
        raise ValueError(f"--input {str(path)!r} holds no examples"
                         + (f" (no line holds a record: {head[0][1]} at line {head[0][0]})." if head else "."))
    first = head[-1][1]
    for flag, field in (("--text-field", text_field), ("--target-field", target_field),
                        ("--id-field", id_field)):
        if field is not None and field not in first:
            raise ValueError(f"{flag} {field!r} is not a field of {str(path)!r}: its fields are "
                             f"{', '.join(map(repr, first))}.")
    return Examples(path, itertools.chain(head, records), (text_field, target_field, id_field), on_bad_row)


def count_examples(path: str | os.PathLike, **fields: Any) -> int:
    """Number of records in `path`, by one streaming pass (for the progress bar's ETA). With
    `read_examples`' options (`text_field=`, ...): the examples, checked (bad rows raise or are
    left out as `on_bad_row` says) before anything expensive starts."""
    if fields:
        return sum(1 for _ in read_examples(path, **fields))
    return sum(1 for _ in _records(pathlib.Path(path)))


def fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 of the rows (text, target, id) of `examples`, in order: a shard's input."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.text, e.target, e.id], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


# ---- the run folder --------------------------------------------------------------------------

def shards(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The complete shards of a run, in order."""
    return sorted(pathlib.Path(out_dir).glob("shard-*.safetensors"))


def load_shards(out_dir: str | os.PathLike) -> Iterator[AttributionTensors]:
    """The results of a run, one shard (one batch) at a time."""
    for path in shards(out_dir):
        yield load(path)


def ids(out: AttributionTensors) -> list[str | int] | None:
    """The ids (`id_field`) of a shard's rows, in order; None when the run had no id field."""
    return json.loads(out.meta["dataset_ids"]) if "dataset_ids" in out.meta else None


def _write_json(path: pathlib.Path, value: Any) -> None:
    """Write `value` to `path` atomically: a temporary file, then a rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _read_record(out_dir: pathlib.Path) -> dict[str, Any] | None:
    """The parsed `run.json` of `out_dir` (None when absent); an older plain-config file is
    read as `{"config": ...}`. A damaged file raises naming it."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is damaged ({error}): restore it, or use another --out "
                         f"(or delete {str(out_dir)!r}) to start again.") from None
    if record.get("format") != RUN_FORMAT:
        return {"format": RUN_FORMAT, "config": record, "shards": [], "skipped": []}
    return record


def _shard_meta(path: pathlib.Path) -> dict[str, str]:
    try:
        meta = load_meta(path)
        int(meta["dataset_start"]), int(meta["dataset_end"])
    except (ValueError, KeyError) as error:
        raise ValueError(f"shard {str(path)!r} is damaged ({error}): delete it and the shards after "
                         "it, then run the same command again to redo them.") from None
    return meta


def _done_shards(out_dir: pathlib.Path) -> list[tuple[pathlib.Path, dict[str, str]]]:
    """The complete shards of `out_dir` with their meta, checked to follow one another."""
    found, done = [], 0
    for i, path in enumerate(shards(out_dir)):
        if path.name != SHARD.format(i):
            raise ValueError(f"{str(out_dir)!r} is missing {SHARD.format(i)} (found {path.name}): "
                             "remove the shards after the gap and run again.")
        meta = _shard_meta(path)
        if int(meta["dataset_start"]) != done:
            raise ValueError(f"{path} starts at example {meta['dataset_start']}, expected {done}.")
        done = int(meta["dataset_end"])
        found.append((path, meta))
    return found


def _entry(path: pathlib.Path, meta: dict[str, str]) -> dict[str, Any]:
    return {"file": path.name, "start": int(meta["dataset_start"]), "end": int(meta["dataset_end"]),
            "sha256": meta.get("dataset_sha256")}


def _resume(out_dir: pathlib.Path, config: dict[str, Any], stream: Iterator[Example]
            ) -> tuple[dict[str, Any], int]:
    """(run record, examples done) of an earlier run in `out_dir`, after checking its settings
    and that the input rows of each of its shards are unchanged (`stream` is advanced past them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _read_record(out_dir)
    earlier = {} if record is None else record["config"]
    changed = sorted(k for k in set(earlier) | set(config) if earlier.get(k) != config.get(k))
    if record is not None and changed:  # a setting left out and one set to None are the same
        raise ValueError(f"--out {str(out_dir)!r} holds a run with other settings "
                         f"({', '.join(changed)}): use a new folder, or the same settings to resume it.")
    for tmp in out_dir.glob(".tmp-*"):
        tmp.unlink()
    found = _done_shards(out_dir)
    for path, meta in found:
        start, end = int(meta["dataset_start"]), int(meta["dataset_end"])
        rows = list(itertools.islice(stream, end - start))
        stored = meta.get("dataset_sha256")
        if len(rows) < end - start or (stored is not None and fingerprint(rows) != stored):
            raise ValueError(f"--out {str(out_dir)!r}: the input changed since {path.name} was "
                             f"written (its examples {start}-{end - 1} are other rows now): use "
                             f"another --out, or delete {str(out_dir)!r} to start again.")
    done = int(found[-1][1]["dataset_end"]) if found else 0
    return {"format": RUN_FORMAT, "config": config, "examples": done,
            "shards": [_entry(p, m) for p, m in found],
            "skipped": (record or {}).get("skipped", [])}, done


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


# ---- running ---------------------------------------------------------------------------------

def _shard(out: AttributionTensors, chunk: list[Example], done: int,
           reduce: str | Reducer | None) -> AttributionTensors:
    """`out` as saved: extra dims reduced, the examples' place, fingerprint and ids in `meta`."""
    if reduce is not None:
        out = aggregate.reduce(out, reduce)
    meta = {**out.meta, "dataset_start": str(done), "dataset_end": str(done + len(chunk)),
            "dataset_sha256": fingerprint(chunk)}
    if any(e.id is not None for e in chunk):
        meta["dataset_ids"] = json.dumps([e.id for e in chunk], ensure_ascii=False)
    return out.replace(meta=meta)


def _skipped(examples: Iterable[Example], record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the bad rows the stream passed over (when it keeps a list of them)."""
    skipped = getattr(examples, "skipped", None)
    if skipped is None:
        return record
    return {**record, "skipped": [dataclasses.asdict(b) for b in skipped]}


def run(
    model: Model, tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example],
    method: Callable, *, out_dir: str | os.PathLike, target_fn: TargetFn = probability,
    batch_size: int = 8, max_new_tokens: int = defaults.MAX_NEW_TOKENS, step_scores: Sequence[str] = (),
    method_args: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
    reduce: str | Reducer | None = None, total: int | None = None, progress: bool = True,
    on_shard: Callable[[pathlib.Path], None] | None = None,
    chat: bool = False, system: str | None = None, keep_template: bool = False,
) -> int:
    """Attribute `examples` in batches of `batch_size`, one shard per batch, into `out_dir`.

    Resumes after the shards already in `out_dir` when `config` (the run's settings, stored in
    `run.json`) matches and the input rows of every shard written are unchanged (SHA-256 in each
    shard's header). `reduce` (an `aggregate.REDUCERS` name or function) reduces the `*extra`
    dims (e.g. hidden) before saving; ids (`Example.id`) go into each shard's
    `meta["dataset_ids"]`. `on_shard(path)` is called after each shard is written. `chat`,
    `system` and `keep_template` write each text into the chat template (see `prepare`).
    Returns the number of examples attributed in total (earlier runs included).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: it must be at least 1.")
    if isinstance(reduce, str) and reduce not in aggregate.REDUCERS:
        raise ValueError(f"--reduce {reduce!r} is not a reduction: use one of "
                         f"{', '.join(aggregate.REDUCERS)}.")
    method_args = dict(method_args or {})
    settings = {"method": getattr(method, "__name__", repr(method)), "method_args": method_args,
                "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "step_scores": list(step_scores), "target_fn": getattr(target_fn, "__name__", ""),
                **({} if reduce is None else {"reduce": reduce if isinstance(reduce, str)
                                              else getattr(reduce, "__name__", repr(reduce))}),
                **({"chat": True, "system": system, "keep_template": keep_template} if chat else {}),
                **(config or {})}
    out_dir, stream = pathlib.Path(out_dir), iter(examples)
    record, done = _resume(out_dir, settings, stream)
    _write_json(out_dir / RUN_FILE, record := _skipped(examples, record))
    index = len(record["shards"])
    bar, task = _progress(total, done, progress)
    start, fresh = time.perf_counter(), 0
    with bar:
        while chunk := list(itertools.islice(stream, batch_size)):
            targets = [e.target for e in chunk]
            batch = prepare(model, tokenizer, [e.text for e in chunk],
                            None if targets[0] is None else targets, max_new_tokens=max_new_tokens,
                            chat=chat, system=system, keep_template=keep_template)
            out = method(model, batch, target_fn, step_scores=tuple(step_scores), **method_args)
            path = out_dir / SHARD.format(index)
            tmp = out_dir / f".tmp-{path.name}"
            out = _shard(out, chunk, done, reduce)
            out.save(tmp)
            os.replace(tmp, path)
            done, index, fresh = done + len(chunk), index + 1, fresh + len(chunk)
            record = _skipped(examples, {**record, "examples": done,
                                         "shards": [*record["shards"], _entry(path, out.meta)]})
            _write_json(out_dir / RUN_FILE, record)
            rate = fresh / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.2f} ex/s")
            if on_shard is not None:
                on_shard(path)
    _write_json(out_dir / RUN_FILE, _skipped(examples, record))
    return done


# ---- showing a run ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run folder holds: its settings, examples and shards done, ids, skipped rows."""

    folder: pathlib.Path
    config: dict[str, Any]
    examples: int
    shards: tuple[pathlib.Path, ...]
    ids: tuple[str | int, ...] | None
    skipped: tuple[BadRow, ...]


def summary(out_dir: str | os.PathLike) -> Summary:
    """Read a run folder (`run.json` and the shards' headers); damaged files raise naming them."""
    folder = pathlib.Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder: pass the --out of a dataset run.")
    record = _read_record(folder)
    found = _done_shards(folder)
    if record is None and not found:
        raise ValueError(f"{str(folder)!r} holds no dataset run (no {RUN_FILE}, no shards).")
    all_ids = [json.loads(m["dataset_ids"]) if "dataset_ids" in m else None for _, m in found]
    skipped = [BadRow(int(b["line"]), str(b["reason"])) for b in (record or {}).get("skipped", [])
               if isinstance(b, dict) and "line" in b]
    return Summary(
        folder=folder, config=dict((record or {}).get("config", {})),
        examples=int(found[-1][1]["dataset_end"]) if found else 0, shards=tuple(p for p, _ in found),
        ids=None if not found or None in all_ids else tuple(i for part in all_ids for i in part),
        skipped=tuple(skipped))


def _some(values: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(map(repr, values[:n]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def describe(out_dir: str | os.PathLike) -> str:
    """A few lines on a run: examples and shards done, method and settings, ids, skipped rows."""
    s = summary(out_dir)
    c = s.config
    fields = ", ".join(f"{k.removesuffix('_field')} field {c[k]!r}" for k in
                       ("text_field", "target_field", "id_field") if c.get(k) is not None)
    lines = [f"run in {str(s.folder)!r}: {s.examples} examples in {len(s.shards)} shards"
             + (f" (batch size {c['batch_size']})" if "batch_size" in c else ""),
             f"method {c.get('method', '?')}, target {c.get('target_fn') or '?'}, "
             f"max_new_tokens {c.get('max_new_tokens', '?')}, step scores {c.get('step_scores') or 'none'}"
             + (f", options {json.dumps(c['method_args'])}" if c.get("method_args") else "")]
    if "input" in c or fields:
        lines.append(f"input: {c.get('input', '?')!r}" + (f" ({fields})" if fields else ""))
    if "model" in c:
        lines.append(f"model: {c['model'] or 'the default model'}")
    lines.append(f"saved: extra dims reduced by {c['reduce']}" if c.get("reduce") else
                 "saved: every extra dim kept (reduced when shown)")
    if s.ids is not None:
        lines.append(f"ids: {_some(s.ids)}")
    lines.append("skipped rows: " + (f"line{'s' * (len(s.skipped) > 1)} {_some([b.line for b in s.skipped])}"
                                     if s.skipped else "none"))
    return "\n".join(lines)


def show(out_dir: str | os.PathLike, *, limit: int | None = 10, file=None, width: int | None = None,
         reduction: str | Reducer | None = None, normalize: bool = False) -> None:
    """Print `describe(out_dir)`, then the table of each of the first `limit` examples (None:
    all), each headed by its example number, id and shard."""
    from rich.console import Console
    from rich.text import Text

    from fnattr import render

    text = describe(out_dir)
    file = file or sys.stdout
    if width is None and not (hasattr(file, "isatty") and file.isatty()):
        width = 1000  # a pipe or file: never truncate cells to a guessed 80 columns
    con = Console(file=file, width=width)
    con.print(Text("\n".join(render.visible(line) for line in text.split("\n"))))
    s, shown = summary(out_dir), 0
    for path in s.shards:
        out = load(path)
        start, keys = int(out.meta["dataset_start"]), ids(out)
        for r in range(out.source.shape[0]):
            if limit is not None and shown >= limit:
                more = s.examples - shown
                con.print(Text(f"... {more} more example{'s' * (more > 1)} (a larger limit shows them)"))
                return
            key = "" if keys is None else f", id {render.visible(repr(keys[r]))}"
            con.print(Text(f"\nexample {start + r}{key} ({path.name}, row {r})", style="bold"))
            hm = render.heatmap(out, row=r, reduction=reduction, normalize=normalize)
            con.print(render.table(dataclasses.replace(hm, title=render.visible(views.title(out)))))
            shown += 1

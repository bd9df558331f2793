"""Attribute a whole dataset (.jsonl, .csv, .parquet, .arrow, a `datasets` folder), one
safetensors shard per batch, resumable.

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

import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from fnattr import aggregate, defaults

from fnattr.render import views
from fnattr.dataset.readers import (  # noqa: F401 (re-exported: the reading half of a dataset run)
    FORMATS,
    ON_BAD_ROW,
    TABLES,
    BadRow,
    Cursor,
    Example,
    Examples,
    count_examples,
    fingerprint,
    read_examples,
)
from fnattr.aggregate import Reducer
from fnattr.api import prepare_call
from fnattr.result import AttributionTensors, load, load_meta
from fnattr.targets import probability
from fnattr.types import Model, TargetFn

SHARD = "shard-{:06d}.safetensors"
RUN_FILE = "run.json"
RUN_FORMAT = "fnattr.dataset/1"
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def attribute_chunk(
    model: Model, tokenizer: PreTrainedTokenizerBase, chunk: list[Example], method: Callable, *,
    start: int, target_fn: TargetFn, max_new_tokens: int, step_scores: Sequence[str],
    method_args: dict[str, Any], reduce: str | Reducer | None, chat: bool, system: str | None,
    keep_template: bool,
) -> AttributionTensors:
    """One batch of a run, as its shard holds it (examples `start`.. of the input)."""
    targets = [e.target for e in chunk]
    call = prepare_call(model, tokenizer, [e.text for e in chunk],
                        None if targets[0] is None else targets, target_fn=target_fn,
                        max_new_tokens=max_new_tokens, chat=chat, system=system,
                        keep_template=keep_template)  # the step `fnattr.attribute` takes
    out = method(model, call.batch, call.target_fn, step_scores=tuple(step_scores), **method_args)
    return _shard(out, chunk, start, reduce)


def _skipped(examples: Iterable[Example], record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the bad rows the stream passed over (when it keeps a list of them)."""
    skipped = getattr(examples, "skipped", None)
    if skipped is None:
        return record
    return {**record, "skipped": [dataclasses.asdict(b) for b in skipped]}


def run_settings(
    method: Callable, *, target_fn: TargetFn, batch_size: int, max_new_tokens: int,
    step_scores: Sequence[str], method_args: dict[str, Any], config: dict[str, Any] | None,
    reduce: str | Reducer | None, chat: bool, system: str | None, keep_template: bool,
) -> dict[str, Any]:
    """What a run's shards depend on, as `run.json` records it (resuming refuses a change);
    checks `batch_size` and `reduce` first. Shared by `run` and `fnattr.distributed.run`."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: it must be at least 1.")
    if isinstance(reduce, str) and reduce not in aggregate.REDUCERS:
        raise ValueError(f"--reduce {reduce!r} is not a reduction: use one of "
                         f"{', '.join(aggregate.REDUCERS)}.")
    return {"method": getattr(method, "__name__", repr(method)), "method_args": method_args,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "step_scores": list(step_scores), "target_fn": getattr(target_fn, "__name__", ""),
            **({} if reduce is None else {"reduce": reduce if isinstance(reduce, str)
                                          else getattr(reduce, "__name__", repr(reduce))}),
            **({"chat": True, "system": system, "keep_template": keep_template} if chat else {}),
            **(config or {})}


def run(
    model: Model, tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example],
    method: Callable, *, out_dir: str | os.PathLike, target_fn: TargetFn = probability,
    batch_size: int = 8, max_new_tokens: int = defaults.MAX_NEW_TOKENS, step_scores: Sequence[str] = (),
    method_args: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
    reduce: str | Reducer | None = None, total: int | None = None, progress: bool = True,
    on_shard: Callable[[pathlib.Path], None] | None = None,
    chat: bool = False, system: str | None = None, keep_template: bool = False,
    command: str | None = None,
) -> int:
    """Attribute `examples` in batches of `batch_size`, one shard per batch, into `out_dir`.

    Resumes after the shards already in `out_dir` when `config` (the run's settings, stored in
    `run.json`) matches and the input rows of every shard written are unchanged (SHA-256 in each
    shard's header). `reduce` (an `aggregate.REDUCERS` name or function) reduces the `*extra`
    dims (e.g. hidden) before saving; ids (`Example.id`) go into each shard's
    `meta["dataset_ids"]`. `on_shard(path)` is called after each shard is written. `chat`,
    `system` and `keep_template` write each text into the chat template (see `prepare`).
    `total` (the input's number of examples) and `command` (the command line that resumes the
    run) go into `run.json`, so that `describe` / `fnattr show` can say what is not done yet.
    Returns the number of examples attributed in total (earlier runs included).
    """
    method_args = dict(method_args or {})
    settings = run_settings(method, target_fn=target_fn, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, step_scores=step_scores,
                            method_args=method_args, config=config, reduce=reduce, chat=chat,
                            system=system, keep_template=keep_template)
    out_dir, stream = pathlib.Path(out_dir), iter(examples)
    record, done = _resume(out_dir, settings, stream)
    record = {**record, **({"total": total} if total is not None else {}),
              **({"command": command} if command else {})}
    _write_json(out_dir / RUN_FILE, record := _skipped(examples, record))
    index = len(record["shards"])
    bar, task = _progress(total, done, progress)
    start, fresh = time.perf_counter(), 0
    with bar:
        while chunk := list(itertools.islice(stream, batch_size)):
            out = attribute_chunk(model, tokenizer, chunk, method, start=done, target_fn=target_fn,
                                  max_new_tokens=max_new_tokens, step_scores=step_scores,
                                  method_args=method_args, reduce=reduce, chat=chat, system=system,
                                  keep_template=keep_template)
            path = out_dir / SHARD.format(index)
            tmp = out_dir / f".tmp-{path.name}"
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
    total: int | None = None  # the input's examples, where the run recorded it
    command: str | None = None  # the command line that resumes the run, where recorded

    @property
    def incomplete(self) -> bool:
        return self.total is not None and self.examples < self.total


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
        skipped=tuple(skipped), total=(record or {}).get("total"), command=(record or {}).get("command"))


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
             + (f" (batch size {c['batch_size']})" if "batch_size" in c else "")
             + (f": {s.examples} of {s.total} rows done" if s.total is not None else ""),
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
    if s.incomplete:
        again = s.command or f"the same command with --out {str(s.folder)!r}"
        lines.append(f"incomplete: {s.total - s.examples} of {s.total} rows not done yet; "
                     f"resume with: {again}")
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

"""Readers of dataset inputs, streamed: (line or row number, record, cursor) of each record.

.jsonl and .csv files are read line by line; .parquet files a row group at a time; .arrow files
and `datasets.save_to_disk` folders memory-mapped, a record batch at a time. A cursor says where
a record starts, so that a read can begin there (`fnattr.distributed` reads each batch from its
own)."""

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# (byte offset, lines before it) in a .jsonl or .csv file; (row, row) in a table
Cursor = tuple[int, int]
FORMATS = ".jsonl, .csv, .parquet, .arrow or a `datasets` folder (save_to_disk)"
TABLES = (".parquet", ".arrow")


def _lines(f, cursor: Cursor, state: list[int]) -> Iterator[str]:
    """The lines of binary file `f` from `cursor` on; `state` follows (offset, line) after each."""
    f.seek(cursor[0])
    state[:] = cursor
    for raw in f:
        state[0], state[1] = state[0] + len(raw), state[1] + 1
        yield raw.decode("utf-8")


def _jsonl(path: pathlib.Path, cursor: Cursor) -> Iterator[tuple[int, dict[str, Any] | str, Cursor]]:
    state = list(cursor)
    with path.open("rb") as f:
        for line in _lines(f, before := cursor, state):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    record = f"not valid JSON ({error.msg})"
                else:
                    record = record if isinstance(record, dict) else "not a JSON object"
                yield state[1], record, before
            before = (state[0], state[1])


def _csv(path: pathlib.Path, cursor: Cursor) -> Iterator[tuple[int, dict[str, Any] | str, Cursor]]:
    state = [0, 0]
    with path.open("rb") as f:
        header = next(csv.reader(_lines(f, (0, 0), state)), None)
        if header is None:
            return
        before = (state[0], state[1]) if cursor == (0, 0) else cursor
        for record in csv.DictReader(_lines(f, before, state), fieldnames=header):
            yield state[1], record, before  # a record over several lines: its last
            before = (state[0], state[1])


def _arrow_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The Arrow files of a `datasets` folder (`save_to_disk`), in order; an .arrow file alone."""
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise ValueError(f"--input {str(path)!r} holds several splits ({', '.join(splits)}): pass "
                         f"one of them, e.g. {str(path / (splits or ['train'])[0])!r}.")
    if not (path / "state.json").is_file():
        raise ValueError(f"--input {str(path)!r} is a folder but no `datasets` folder (no state.json): "
                         f"pass {FORMATS}.")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return [path / f["filename"] for f in state["_data_files"]]


def _batches(path: pathlib.Path, row: int) -> Iterator[Any]:
    """Record batches of a table from row `row` on, memory-mapped or read a row group at a time."""
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        sizes = [table.metadata.row_group(g).num_rows for g in range(table.num_row_groups)]
        first = next((g for g, end in enumerate(itertools.accumulate(sizes)) if end > row), len(sizes))
        row -= sum(sizes[:first])
        parts: Iterable = table.iter_batches(batch_size=1024, row_groups=range(first, len(sizes)))
    else:
        def arrow() -> Iterator[Any]:
            for file in _arrow_files(path):
                source = pa.memory_map(str(file))
                try:  # `datasets` writes the stream format; feather files are the file format
                    yield from pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        parts = arrow()
    for part in parts:
        if row < part.num_rows:
            yield part.slice(row)
        row = max(0, row - part.num_rows)


def _table(path: pathlib.Path, cursor: Cursor) -> Iterator[tuple[int, dict[str, Any] | str, Cursor]]:
    n = cursor[0]
    for part in _batches(path, n):
        for record in part.to_pylist():
            yield n + 1, record, (n, n)
            n += 1


def records(path: pathlib.Path, cursor: Cursor = (0, 0)
             ) -> Iterator[tuple[int, dict[str, Any] | str, Cursor]]:
    """(line or row number, record or why the line is no record, cursor of the record) of an
    input, streamed from `cursor` on. The format is checked when this is called."""
    if path.suffix == ".jsonl":
        return _jsonl(path, cursor)
    if path.suffix == ".csv":
        return _csv(path, cursor)
    if is_table(path):
        if path.is_dir():
            _arrow_files(path)  # a folder of another kind raises now
        return _table(path, cursor)
    raise ValueError(f"--input {str(path)!r} is not {FORMATS}: convert it to one of them.")


def is_table(path: pathlib.Path) -> bool:
    """Whether `path` is read as a table (parquet, Arrow, a `datasets` folder) rather than as lines."""
    return path.suffix in TABLES or path.is_dir()


def where(path: pathlib.Path, n: int) -> str:
    """`path:line` of a text file, `path: row n` of a table."""
    return f"{path}: row {n}" if is_table(path) else f"{path}:{n}"


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
    return ValueError(f"{where(path, n)}: {why}: fix that {'row' if is_table(path) else 'line'}, "
                      "or pass --on-bad-row skip to pass over it.")


class Examples(Iterator[Example]):
    """The examples of a file, streamed (`read_examples`); `skipped` lists the bad rows passed
    over so far when `on_bad_row="skip"`; `cursor` is where the last example returned starts
    (`read_examples(..., start=cursor)` begins there)."""

    def __init__(self, path: pathlib.Path, records: Iterator, fields: tuple, on_bad_row: str) -> None:
        self.path = path
        self.skipped: list[BadRow] = []
        self.cursor: Cursor | None = None
        self._rows = self._examples(records, fields, on_bad_row)

    def _examples(self, records, fields, on_bad_row) -> Iterator[Example]:
        for n, record, cursor in records:
            got = record if isinstance(record, str) else _example(record, n, fields)
            if isinstance(got, Example):
                self.cursor = cursor
                yield got
            elif on_bad_row == "skip":
                self.skipped.append(BadRow(n, got))
            else:
                raise _bad(self.path, n, got)

    def __next__(self) -> Example:
        return next(self._rows)


def read_examples(
    path: str | os.PathLike, *, text_field: str, target_field: str | None = None,
    id_field: str | None = None, on_bad_row: str = "stop", start: Cursor = (0, 0),
) -> Examples:
    """Stream the examples of `path`; a missing field is reported with the fields that exist.

    `path`: a .jsonl or .csv file (numbered by line), a .parquet or .arrow file or a folder
    written by `datasets.Dataset.save_to_disk` (numbered by row, from 1), read a batch of rows
    at a time. A row without usable text (empty, not a string, not JSON), target or id stops the
    stream with an error naming its file line (`on_bad_row="stop"`), or is passed over and
    listed in `.skipped` (`"skip"`; a dataset run records those lines in its `run.json`).
    `start`: an `Examples.cursor` of an earlier read of the same file, to begin at that example."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"--on-bad-row {on_bad_row!r}: use one of {', '.join(ON_BAD_ROW)}.")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist: pass {FORMATS}.")
    stream = records(path, start)  # validates the format before the first record is asked for
    head: list[tuple[int, Any, Cursor]] = []  # rows up to the first record: its fields are checked here
    for n, record, cursor in stream:
        head.append((n, record, cursor))
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
    return Examples(path, itertools.chain(head, stream), (text_field, target_field, id_field), on_bad_row)


def count_examples(path: str | os.PathLike, **fields: Any) -> int:
    """Number of records in `path`, by one streaming pass (for the progress bar's ETA). With
    `read_examples`' options (`text_field=`, ...): the examples, checked (bad rows raise or are
    left out as `on_bad_row` says) before anything expensive starts."""
    if fields:
        return sum(1 for _ in read_examples(path, **fields))
    return sum(1 for _ in records(pathlib.Path(path)))


def fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 of the rows (text, target, id) of `examples`, in order: a shard's input."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.text, e.target, e.id], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def batch_block(path: str, fields: dict[str, Any], cursor: Cursor, count: int, sha256: str,
                index: int, start: int) -> Iterator[Any]:
    """A read task of `fnattr.distributed`: the `count` examples from `cursor` on (checked
    against their fingerprint `sha256`) as one Arrow row (shard `index`, first example `start`).
    It lives here, with nothing but pyarrow to import, because each read task imports it."""
    import pyarrow as pa

    chunk = list(itertools.islice(read_examples(path, **fields, on_bad_row="skip", start=cursor), count))
    if len(chunk) < count or fingerprint(chunk) != sha256:
        raise ValueError(f"--input {path!r} changed during the run (examples {start}-{start + count - 1} "
                         "are other rows now): run the same command again to resume from the shards "
                         "written.")
    examples = json.dumps([[e.text, e.target, e.id, e.line] for e in chunk], ensure_ascii=False)
    yield pa.table({"index": [index], "start": [start], "examples": [examples]})

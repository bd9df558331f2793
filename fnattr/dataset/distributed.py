"""Attribute a dataset on a Ray cluster: the shards of `fnattr.dataset.run`, from N workers.

Needs the `ray` extra (`pip install "fnattr[ray]"`). The driver reads the input once (every row
checked, each batch's place noted); Ray Data then reads each batch from the input again in its
read tasks and runs them through `map_batches` on a pool of actors, each of which loads the model
once. The driver writes the shards in input order as they come back, under the same names, with
the same `run.json`, as the single-process run: `dataset.show`, `summary`, `load_shards` and a
resume (by either kind of run) read them alike, and the tensors are the same.

>>> from fnattr import distributed, methods
>>> distributed.run("facts.jsonl", distributed.ModelSpec("path/to/model"), methods.saliency,
...                 out_dir="runs/facts", text_field="text", workers=4, gpus_per_worker=1)

A worker that dies is restarted by Ray and its batch run again; a batch that fails (a row the
model cannot take) stops the run with an error naming its rows, after the shards before it.
"""

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fnattr import defaults
from fnattr.dataset import readers as _input
from fnattr.dataset import runs as dataset
from fnattr.aggregate import Reducer
from fnattr.dataset.readers import Cursor, Example
from fnattr.targets import probability
from fnattr.types import TargetFn

__all__ = ["ModelSpec", "WorkerError", "check_address", "run"]


class WorkerError(RuntimeError):
    """A worker could not load the model, or a batch failed on it; the message names which."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How each worker loads the model: the arguments of `fnattr.loading.load_model`, picklable.

    `device` None: `cuda` where the worker was given a GPU, else `cpu`. `device_map`
    ("auto", or a dict of module name -> device) spreads a model too large for one device over
    the worker's devices (and CPU / disk) through accelerate. Any picklable callable returning
    `(model, tokenizer)` can stand in for a ModelSpec."""

    name_or_path: str | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | dict[str, int | str] | None = None
    offload_folder: str | None = None
    trust_remote_code: bool = False

    def __call__(self) -> tuple[Any, Any]:
        import torch

        from fnattr.loading import load_model

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra = {} if self.device_map is None else {"device_map": self.device_map,
                                                    "offload_folder": self.offload_folder}
        return load_model(self.name_or_path, dtype=self.dtype, device=device,
                          trust_remote_code=self.trust_remote_code, **extra)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One batch still to do: shard `index`, examples `start`.. (`count` of them) of the input,
    read from `cursor` on; `sha256` is their fingerprint."""

    index: int
    start: int
    count: int
    cursor: Cursor
    sha256: str


def _plans(examples: dataset.Examples, batch_size: int, index: int, done: int) -> Iterator[_Plan]:
    """The batches left in `examples` (a stream advanced past the shards already written)."""
    while (first := next(examples, None)) is not None:
        cursor = examples.cursor
        chunk = [first, *itertools.islice(examples, batch_size - 1)]
        yield _Plan(index, done, len(chunk), cursor, dataset.fingerprint(chunk))
        index, done = index + 1, done + len(chunk)


def _datasource(path: str, fields: dict[str, Any], plans: Sequence[_Plan]):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class Batches(Datasource):
        """One read task, one block and one row per batch still to do, in input order."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            meta = BlockMetadata(num_rows=1, size_bytes=None, exec_stats=None, input_files=[path])
            return [ReadTask(functools.partial(_input.batch_block, path, fields, p.cursor, p.count,
                                               p.sha256, p.index, p.start), meta) for p in plans]

    return Batches()


class _Worker:
    """Ray Data actor: loads the model once, then attributes one batch per call into the bytes
    of its shard."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]], input_path: str,
                 method: Callable, options: dict[str, Any]) -> None:
        self.where = f"worker {socket.gethostname()} pid {os.getpid()}"
        self.input_path, self.method, self.options = input_path, method, options
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this process is ours: no bars in the driver's log
        try:
            self.model, self.tokenizer = loader()
        except Exception as error:
            raise WorkerError(f"{self.where} could not load the model with {loader!r}: "
                              f"{type(error).__name__}: {error}") from None

    def _one(self, chunk: list[Example], start: int) -> Any:
        return dataset.attribute_chunk(self.model, self.tokenizer, chunk, self.method, start=start,
                                       **self.options)

    def _failed(self, chunk: list[Example], start: int, index: int, error: Exception) -> WorkerError:
        """The error of a failed batch, naming its rows and, found by running them one at a
        time, the first row that fails alone."""
        culprit = ""
        for i, example in enumerate(chunk):
            try:
                self._one([example], start + i)
            except Exception:
                culprit = (f"; {_row(self.input_path, example)} fails alone (example {start + i}"
                           + ("" if example.id is None else f", id {example.id!r}") + ")")
                break
        return WorkerError(f"{self.input_path}: the batch of {_row(self.input_path, chunk[0])} to "
                           f"{_row(self.input_path, chunk[-1])} (examples {start}-{start + len(chunk) - 1}, "
                           f"shard {dataset.SHARD.format(index)}) failed on {self.where}: "
                           f"{type(error).__name__}: {error}{culprit}")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"index": [], "shard": [], "pid": [], "error": []}
        for index, start, text in zip(batch["index"], batch["start"], batch["examples"], strict=True):
            index, start = int(index), int(start)
            chunk = [Example(t, target, key, line) for t, target, key, line in json.loads(text)]
            try:
                result, failed = self._one(chunk, start), ""
            except Exception as error:  # returned, not raised: the driver first writes the shards before it
                result, failed = None, str(self._failed(chunk, start, index, error))
            with tempfile.TemporaryDirectory(prefix="fnattr-") as folder:
                path = pathlib.Path(folder) / "shard.safetensors"
                if result is not None:
                    result.save(path)
                out["shard"].append(path.read_bytes() if result is not None else b"")
            out["error"].append(failed)
            out["index"].append(index)
            out["pid"].append(os.getpid())
        return out


def _row(path: str, example: Example) -> str:
    table = path.endswith(dataset.TABLES) or os.path.isdir(path)
    return f"{'row' if table else 'line'} {example.line}"


def check_address(address: str | None, *, timeout: float = 5.0) -> None:
    """Raise a ConnectionError naming `address` when nothing answers there (None, "auto" and
    "local" are not checked: Ray itself finds or starts those)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is not host:port (e.g. 10.0.0.5:6379, "
                         "ray://10.0.0.5:10001, or auto).")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"--ray-address {address!r}: nothing answers at {host}:{port} ({error}): "
                              "start the cluster there (`ray start --head`), or leave --ray-address "
                              "out to run on a Ray started on this machine.") from None


def _connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start Ray here; False when Ray was already running."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConnectionError(f"--ray-address {address!r}: could not join a Ray cluster there "
                              f"({error}).") from None
    return True


def _worker_error(error: BaseException) -> WorkerError | None:
    """Our WorkerError inside the exceptions Ray wraps it in (as an object, or as the text of a
    remote traceback), if any."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        if isinstance(error, WorkerError) and "Traceback" not in str(error):
            return error
        chain.append(error)
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    found = re.findall(r"WorkerError: (.+)", "\n".join(map(str, chain)))
    return WorkerError(found[-1].strip()) if found else None


def run(
    input: str | os.PathLike, loader: Callable[[], tuple[Any, Any]], method: Callable, *,
    out_dir: str | os.PathLike, text_field: str, target_field: str | None = None,
    id_field: str | None = None, on_bad_row: str = "stop", target_fn: TargetFn = probability,
    batch_size: int = 8, max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    step_scores: Sequence[str] = (), method_args: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None, reduce: str | Reducer | None = None,
    chat: bool = False, system: str | None = None, keep_template: bool = False,
    workers: int = 2, gpus_per_worker: int | float = 0, cpus_per_worker: int | float = 1,
    address: str | None = None, progress: bool = True,
    on_shard: Callable[[pathlib.Path, int], None] | None = None,
) -> int:
    """`fnattr.dataset.run` over the examples of `input` on `workers` Ray actors.

    `loader()` (a `ModelSpec`, or any picklable callable) gives each worker its `(model,
    tokenizer)`; each worker takes `gpus_per_worker` GPUs and `cpus_per_worker` CPUs. `address`:
    None starts Ray on this machine (or uses the Ray this process already joined); "host:port",
    "ray://host:port" or "auto" joins a running cluster, whose nodes must all read `input` at
    the same path. The other arguments, and `out_dir`, are those of `dataset.read_examples` and
    `dataset.run`: the same input and settings give the same shards and `run.json`, and either
    kind of run resumes the other's. `on_shard(path, pid)` is called after each shard is
    written, with the pid of the worker that made it. Returns the number of examples attributed
    in total (earlier runs included).
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: it must be at least 1.")
    method_args = dict(method_args or {})
    settings = dataset.run_settings(method, target_fn=target_fn, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, step_scores=step_scores,
                                    method_args=method_args, config=config, reduce=reduce,
                                    chat=chat, system=system, keep_template=keep_template)
    check_address(address)
    fields = {"text_field": text_field, "target_field": target_field, "id_field": id_field}
    examples = dataset.read_examples(input, **fields, on_bad_row=on_bad_row)
    out_dir = pathlib.Path(out_dir)
    record, done = dataset._resume(out_dir, settings, examples)
    # every row checked (a bad one stops here, before Ray starts) and each batch placed
    plans = list(_plans(examples, batch_size, len(record["shards"]), done))
    record = dataset._skipped(examples, record)
    dataset._write_json(out_dir / dataset.RUN_FILE, record)
    if not plans:
        return done
    options = {"target_fn": target_fn, "max_new_tokens": max_new_tokens, "step_scores": tuple(step_scores),
               "method_args": method_args, "reduce": reduce, "chat": chat, "system": system,
               "keep_template": keep_template}
    started = _connect(address)
    try:
        return _execute(os.path.abspath(input), fields, plans, (loader, method, options), out_dir, record,
                        workers=workers, gpus=gpus_per_worker, cpus=cpus_per_worker,
                        total=done + sum(p.count for p in plans), progress=progress, on_shard=on_shard)
    finally:
        if started:
            import ray

            ray.shutdown()


def _execute(path: str, fields: dict[str, Any], plans: list[_Plan], work: tuple, out_dir: pathlib.Path,
             record: dict[str, Any], *, workers: int, gpus: int | float, cpus: int | float, total: int,
             progress: bool, on_shard: Callable | None) -> int:
    """Run the batches of `plans` on the actors; write each shard, in order, as it arrives."""
    import ray

    context = ray.data.DataContext.get_current()
    kept = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        loader, method, options = work
        source = _datasource(path, fields, plans)
        # reading a batch is cheap: one read task at a time, holding no CPU the actors could need
        rows = ray.data.read_datasource(source, override_num_blocks=len(plans), num_cpus=0,
                                        concurrency=1).map_batches(
            _Worker, fn_constructor_args=(loader, path, method, options), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=cpus,
            batch_format="numpy")
        done = record["examples"]
        bar, task = dataset._progress(total, done, progress)
        record_start, start = done, time.perf_counter()
        with bar:
            for plan, row in zip(plans, _rows(rows)):
                if int(row["index"]) != plan.index:  # cannot happen with preserve_order
                    raise RuntimeError(f"shard {row['index']} arrived where {plan.index} was due.")
                if row["error"]:
                    kept_shards = (f"{dataset.SHARD.format(plan.index - 1)} and the shards before it are "
                                   "written" if plan.index else "no shard was written")
                    raise WorkerError(f"{row['error']} ({kept_shards}: fix the row, or leave it out, "
                                      "and run the same command again to resume)")
                shard = out_dir / dataset.SHARD.format(plan.index)
                tmp = out_dir / f".tmp-{shard.name}"
                tmp.write_bytes(bytes(row["shard"]))
                os.replace(tmp, shard)
                done = plan.start + plan.count
                record = {**record, "examples": done, "shards": [
                    *record["shards"], dataset._entry(shard, dataset.load_meta(shard))]}
                dataset._write_json(out_dir / dataset.RUN_FILE, record)
                rate = (done - record_start) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:.2f} ex/s")
                if on_shard is not None:
                    on_shard(shard, int(row["pid"]))
        if done != total:  # Ray returned fewer batches than it was given
            raise RuntimeError(f"Ray returned the batches up to example {done} of {total}: run the "
                               "same command again to resume after the shards written.")
        return done
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = kept


def _rows(rows: Any) -> Iterator[dict[str, Any]]:
    """The rows of a Ray dataset; a WorkerError inside Ray's wrapping comes out as itself."""
    try:
        yield from rows.iter_rows()
    except Exception as error:
        found = _worker_error(error)
        if found is None:
            raise
        raise found from None

"""Rows per second of a dataset run: one process against Ray with 1 and 2 workers, and Ray's cost.

Run: python -m benchmarks.bench_ray [--rows 24] [--batch-size 4] [--method saliency]
SmolLM2-135M (float32) on PROMPTS, forced 4-token targets, in one benchmark run: the single-process
`dataset.run` in this process (1 torch thread, as a worker holding 1 CPU: on 2 shared cores, 2
threads ran 9x slower in one run), then `fnattr.distributed.run` on a local Ray started here
(`num_cpus=2`). Wall and CPU seconds for each; a Ray run's CPU is this process's plus every Ray
process under it (sampled after each shard, so the last moments of a worker are missed), and its
wall includes starting the workers (each imports torch and loads the model), shown apart as
"first shard after", and the rate after it (the rows of the later shards over the time from the
first shard to the last) is the steady rate. The last column compares every score with the
single-process run's.
"""

import argparse
import itertools
import json
import pathlib
import tempfile
import time

import psutil
import torch

from benchmarks._common import PROMPTS, load
from fnattr import dataset, distributed
from fnattr.methods import METHODS
from fnattr.result import load as load_result


def _cpu(pids: dict[int, float]) -> None:
    """Record the CPU seconds so far of this process and every process under it."""
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            pids[p.pid] = max(pids.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass


def _diff(a: pathlib.Path, b: pathlib.Path) -> float:
    """Largest |difference| between the scores of two runs' shards (inf: other shards)."""
    pairs = list(zip(dataset.shards(a), dataset.shards(b)))
    if not pairs or len(pairs) != len(dataset.shards(a)) or len(pairs) != len(dataset.shards(b)):
        return float("inf")
    return max((load_result(x).source - load_result(y).source).abs().max().item() for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--method", default="saliency")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the single process (a Ray worker holds 1 CPU: 1 thread)")
    args = parser.parse_args()
    import ray

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "target": " Paris is big"}) + "\n"
                            for t in itertools.islice(itertools.cycle(PROMPTS), args.rows)))
    method = METHODS[args.method]
    settings = {"text_field": "text", "target_field": "target", "batch_size": args.batch_size,
                "max_new_tokens": 4, "progress": False}
    fields = {k: settings[k] for k in ("text_field", "target_field")}
    run_args = {k: v for k, v in settings.items() if k not in fields}
    print(f"SmolLM2-135M float32, {args.rows} rows, batch {args.batch_size}, {args.method}, "
          f"{psutil.cpu_count()} CPUs (shared: absolute seconds are noisy, ratios are from this one run)")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load()
    model = model.float()
    loaded = time.perf_counter() - t0
    wall, cpu = time.perf_counter(), time.process_time()
    dataset.run(model, tok, dataset.read_examples(data, **fields), method, out_dir=root / "single",
                **run_args)
    single = (time.perf_counter() - wall, time.process_time() - cpu)
    print(f"single process, {args.threads} thread{'s' * (args.threads > 1)}  wall {single[0]:6.1f}s  cpu {single[1]:6.1f}s  "
          f"{args.rows / single[0]:5.2f} rows/s  (model load {loaded:.1f}s, not counted)")
    del model

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"ray.init         wall {time.perf_counter() - t0:6.1f}s  (once per session, not counted)")
    results = {}
    for workers in (1, 2):
        before: dict[int, float] = {}
        _cpu(before)
        after, first = dict(before), []
        start = time.perf_counter()

        def sample(path, pid, first=first, start=start, after=after):
            first.append(time.perf_counter() - start)
            _cpu(after)

        distributed.run(data, distributed.ModelSpec(dtype="float32"), method,
                        out_dir=root / f"ray{workers}", workers=workers, on_shard=sample,
                        **fields, **run_args)
        wall = time.perf_counter() - start
        cpu = sum(after.values()) - sum(before.get(p, 0.0) for p in after)
        results[workers] = (wall, cpu)
        diff = _diff(root / "single", root / f"ray{workers}")
        print(f"ray, {workers} worker{'s' * (workers > 1)}{' ' * (workers == 1)}          wall {wall:6.1f}s  cpu {cpu:6.1f}s  "
              f"{args.rows / wall:5.2f} rows/s  first shard after {first[0]:.1f}s, then "
              f"{(args.rows - args.batch_size) / max(first[-1] - first[0], 1e-9):5.2f} rows/s  "
              f"max |score - single| {diff:.1e}")
    ray.shutdown()
    (w1, c1), (w2, c2) = results[1], results[2]
    print(f"ratios: ray 1 worker / single  wall {w1 / single[0]:.2f}x  cpu {c1 / single[1]:.2f}x;  "
          f"2 workers / 1 worker  wall {w2 / w1:.2f}x  cpu {c2 / c1:.2f}x")
    print(f"Ray's cost per row (1 worker - single): wall {(w1 - single[0]) / args.rows:.2f}s  "
          f"cpu {(c1 - single[1]) / args.rows:.2f}s  (worker start-up included)")


if __name__ == "__main__":
    main()

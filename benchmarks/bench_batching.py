"""A batch against its rows run alone, on CPU: with length buckets (the default), without them
(one padded batch), and as single calls.

Run: python -m benchmarks.bench_batching [--n-steps 8] [--rounds 2] [--default-ig]
SmolLM2-135M; two batches of 8 rows: "like lengths" (8 short prompts, 5-8 tokens, each with
the 20-token target) and "mixed lengths" (4 of those prompts with a 4-token target, and 4
20-token prompts with the 20-token target). Every ratio compares runs made in this one process,
interleaved round by round, by CPU seconds (`time.process_time`); each configuration's best
round is shown. The buckets must not change the results: the largest relative difference
against the padded batch is printed too.

`--default-ig` runs instead IG with its defaults (n_steps="auto", method="auto": adaptive) on the
eight prompts, each with its own 8 greedy tokens (as the demo): a batch of 8 against 8 singles.
"""

import argparse
from contextlib import contextmanager
from unittest import mock

import torch

import fnattr
from benchmarks._common import PROMPT, PROMPTS, TARGET, load, timed
from fnattr.methods import _buckets, _triangular, integrated_gradients, saliency


@contextmanager
def one_padded_batch():
    """No buckets and no cropping: every chunk runs at the batch's full width."""
    with (mock.patch.object(_buckets, "buckets", lambda batch, rows, *a, **k: [list(rows)]),
          mock.patch.object(_triangular, "_cropped", lambda *a: None)):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--default-ig", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load()
    if args.default_ig:
        return default_ig(model, tok, args.rounds)
    short = " " + " ".join(TARGET.split()[:3])  # " The Seine flows"
    inputs = {"like lengths": (PROMPTS, [TARGET] * 8),
              "mixed lengths": (PROMPTS[:4] + [PROMPT] * 4, [short] * 4 + [TARGET] * 4)}
    methods = {"saliency": (saliency, {}),
               f"IG({args.n_steps})": (integrated_gradients, {"n_steps": args.n_steps})}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, best of {args.rounds} "
          "interleaved rounds, CPU seconds", flush=True)
    for label, (sources, targets) in inputs.items():
        batch = fnattr.prepare(model, tok, sources, targets)
        singles = [fnattr.prepare(model, tok, s, t) for s, t in zip(sources, targets)]
        lengths = [(int(b.source_mask.sum()), int(b.target_mask.sum())) for b in singles]
        parts = _buckets.buckets(batch, list(range(8)), args.n_steps, 64)
        print(f"{label}: (prompt, target) tokens per row {lengths}; padded to "
              f"{tuple(batch.source_ids.shape[1:]) + tuple(batch.target_ids.shape[1:])}; "
              f"IG buckets {parts}", flush=True)
        for name, (fn, kw) in methods.items():
            cpu = {"buckets": [], "padded": [], "singles": []}
            outs = {}
            for _ in range(args.rounds):
                _, c, outs["buckets"] = timed(lambda: fn(model, batch, **kw))
                cpu["buckets"].append(c)
                with one_padded_batch():
                    _, c, outs["padded"] = timed(lambda: fn(model, batch, **kw))
                cpu["padded"].append(c)
                cpu["singles"].append(timed(lambda: [fn(model, b, **kw) for b in singles])[1])
            a, b = outs["buckets"].source, outs["padded"].source
            diff = float((a - b).abs().max() / b.abs().max())
            best = {k: min(v) for k, v in cpu.items()}
            print(f"  {name:8s} cpu: batch {best['buckets']:6.1f}s  padded batch {best['padded']:6.1f}s  "
                  f"8 singles {best['singles']:6.1f}s  |  singles / batch {best['singles'] / best['buckets']:4.2f}x  "
                  f"singles / padded batch {best['singles'] / best['padded']:4.2f}x  "
                  f"(max rel diff {diff:.1e})", flush=True)


def default_ig(model, tok, rounds: int) -> None:
    """IG with its defaults, a batch of the eight prompts (their greedy 8 tokens forced) against
    the rows alone, with the points each computed (adaptive refines per row and step, so a batch
    and its singles compute the same nodes; tests/methods/test_adaptive_ig.py checks the scores)."""
    import json
    import warnings

    singles = [fnattr.prepare(model, tok, [p], max_new_tokens=8) for p in PROMPTS]
    targets = ["".join(b.target_tokens[0]) for b in singles]
    batch = fnattr.prepare(model, tok, PROMPTS, targets)
    cpu = {"batch": [], "singles": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            _, c, out = timed(lambda: integrated_gradients(model, batch))
            cpu["batch"].append(c)
            _, c, alone = timed(lambda: [integrated_gradients(model, b) for b in singles])
            cpu["singles"].append(c)
    rule = json.loads(out.meta["completeness"])["rule"]
    points = sum(sum(p) for p in json.loads(out.meta["completeness"])["points"])
    alone_points = sum(sum(json.loads(o.meta["completeness"])["points"][0]) for o in alone)
    best = {k: min(v) for k, v in cpu.items()}
    print(f"IG defaults (rule {rule}), 8 prompts x 8 greedy tokens: cpu batch {best['batch']:6.1f}s "
          f"({points} points)  8 singles {best['singles']:6.1f}s ({alone_points} points)  |  "
          f"singles / batch {best['singles'] / best['batch']:4.2f}x", flush=True)


if __name__ == "__main__":
    main()

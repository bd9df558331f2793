"""Cost of scoring one attribution's faithfulness (`fnattr.evaluate.metrics`) on the demo.

Run: python -m benchmarks.bench_evaluate            (one method against a peer loop)
     python -m benchmarks.bench_evaluate --shared   (5 methods in shared forwards against 1;
                                                     quick: 3 new tokens; --full: 8)
SmolLM2-135M, "The capital of France is" + 8 greedy tokens, saliency attributions, the four
metrics at their default levels, no random baseline (n_random=0). Prints, measured in this one
process: one clean forward of the whole sequence; fnattr's cost as a multiple of it; and the loop a
peer would run (one forward of the step's prefix per (step, removal level), the same number of
model rows as fnattr's batched copies), as a ratio to fnattr. CPU seconds next to wall seconds.
"""

import statistics
import sys

import torch

import fnattr
from benchmarks._common import load, timed
from fnattr.evaluate import faithfulness


def main() -> None:
    model, tok = load()
    batch = fnattr.prepare(model, tok, "The capital of France is", max_new_tokens=8)
    ids = torch.cat([batch.source_ids, batch.target_ids[:, :-1]], 1)
    n_src, n_steps = batch.source_ids.shape[1], batch.target_ids.shape[1]
    out = fnattr.methods.saliency(model, batch)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        fwd = [timed(lambda: model(input_ids=ids, use_cache=False))[:2] for _ in range(5)]
    fwd_wall, fwd_cpu = (statistics.median(t) for t in zip(*fwd))
    wall, cpu, result = timed(lambda: faithfulness(model, batch, out, n_random=0))
    rows = int(result.meta["forward_rows"])
    per_step = rows // n_steps  # copies per step: every removal level of every metric

    def peer_loop():
        with torch.no_grad():
            for t in range(n_steps):
                for _ in range(per_step):
                    model(input_ids=ids[:, :n_src + t], use_cache=False)

    p_wall, p_cpu, _ = timed(peer_loop)
    print(f"SmolLM2-135M, {n_src} prompt + {n_steps} generated tokens, saliency, "
          f"4 metrics, {rows} perturbed copies ({per_step} per step), removal: "
          f"{result.meta['removal_kind']}")
    print(f"one forward            wall {fwd_wall * 1e3:7.1f} ms  cpu {fwd_cpu * 1e3:7.1f} ms")
    print(f"fnattr faithfulness    wall {wall:7.2f} s   cpu {cpu:7.2f} s   = {wall / fwd_wall:5.1f} "
          f"forwards (wall), {cpu / fwd_cpu:5.1f} (cpu)")
    print(f"per-step peer loop     wall {p_wall:7.2f} s   cpu {p_cpu:7.2f} s   "
          f"({n_steps * per_step} prefix forwards)")
    print(f"peer loop / fnattr:    wall {p_wall / wall:.1f}x  cpu {p_cpu / cpu:.1f}x")
    print({k: round(v["value"], 4) if isinstance(v, dict) and "value" in v else v
           for k, v in result.summary().items()})


SHARED = ("saliency", "input_x_gradient", "occlusion", "attention", "value_zeroing")


def shared(full: bool = False) -> None:
    """Scoring 5 methods' attributions of one example in shared forwards
    (`fnattr.evaluate.shared.faithfulness_many`, what `fnattr evaluate` runs) against scoring
    one (`faithfulness`), default options (5 random rankings), in this one process."""
    from fnattr.evaluate.shared import faithfulness_many

    model, tok = load()
    batch = fnattr.prepare(model, tok, "The capital of France is", max_new_tokens=8 if full else 3)
    outs = {m: fnattr.methods.METHODS[m](model, batch) for m in SHARED}
    faithfulness(model, batch, outs["saliency"], n_random=0, curve_levels=1, fractions=(0.5,))  # warm-up
    one_wall, one_cpu, one = timed(lambda: faithfulness(model, batch, outs["saliency"]))
    sep = [timed(lambda m=m: faithfulness(model, batch, outs[m])) for m in SHARED[1:]]
    all_wall, all_cpu, many = timed(lambda: faithfulness_many(model, batch, outs))
    sep_wall = one_wall + sum(t[0] for t in sep)
    rows_sep = int(one.meta["forward_rows"]) + sum(int(t[2].meta["forward_rows"]) for t in sep)
    print(f"SmolLM2-135M, {batch.source_ids.shape[1]} prompt + {batch.target_ids.shape[1]} "
          f"generated tokens, 4 metrics, 5 random rankings, removal auto")
    print(f"scoring 1 method (saliency)     wall {one_wall:7.2f} s  cpu {one_cpu:7.2f} s  "
          f"{one.meta['forward_rows']} copies")
    print(f"scoring 5 methods, one by one   wall {sep_wall:7.2f} s  {rows_sep} copies")
    print(f"scoring 5 methods, shared       wall {all_wall:7.2f} s  cpu {all_cpu:7.2f} s  "
          f"{many['saliency'].meta['forward_rows']} copies")
    rows_one, rows_all = int(one.meta["forward_rows"]), int(many["saliency"].meta["forward_rows"])
    print(f"shared 5 / one: {all_wall / one_wall:.2f}x wall, {all_cpu / one_cpu:.2f}x cpu, "
          f"{rows_all / rows_one:.2f}x copies (goal <= 2x); one by one / shared: "
          f"{sep_wall / all_wall:.2f}x wall, {rows_sep / rows_all:.2f}x copies")


if __name__ == "__main__":
    if "--shared" in sys.argv:
        shared(full="--full" in sys.argv)
    else:
        main()

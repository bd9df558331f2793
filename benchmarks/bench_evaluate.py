"""Cost of scoring one attribution's faithfulness (`fnattr.evaluate.metrics`) on the demo.

Run: python -m benchmarks.bench_evaluate
SmolLM2-135M, "The capital of France is" + 8 greedy tokens, saliency attributions, the four
metrics at their default levels, no random baseline (n_random=0). Prints, measured in this one
process: one clean forward of the whole sequence; fnattr's cost as a multiple of it; and the loop a
peer would run (one forward of the step's prefix per (step, removal level), the same number of
model rows as fnattr's batched copies), as a ratio to fnattr. CPU seconds next to wall seconds.
"""

import statistics

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


if __name__ == "__main__":
    main()

"""AttnLRP's cost on SmolLM2-135M against input x gradient, saliency and IG (and CP-LRP).

Run: OMP_NUM_THREADS=1 python -m benchmarks.bench_lrp [--quick] [--rounds 1] [--ig-steps 8]
20 prompt + 20 forced target tokens, every step attributed, target the logit for every method.
Methods run interleaved (one of each per round, `--rounds` rounds); each is timed in CPU
seconds of this process (`time.process_time`, what the goal is stated in) and wall seconds; the
least of its rounds is reported. The goal (issue 25) is AttnLRP within 1.5x of input x gradient:
both are one forward and one batched backward, AttnLRP's backward runs its rules' extra
elementwise operations and the forward the norms' surrogates. `--quick` attributes the last 2
steps only (a check that everything runs, in seconds).
"""

import argparse

import fnattr
from benchmarks._common import PROMPT, TARGET, load, timed
from fnattr.methods import attnlrp, cp_lrp, input_x_gradient, integrated_gradients, saliency
from fnattr.targets import logit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ig-steps", type=int, default=8)
    args = parser.parse_args()
    model, tok = load()
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    rng = {"attr_pos_start": -2} if args.quick else {}
    n_src, n_tgt = batch.source_ids.shape[1], batch.target_ids.shape[1]
    print(f"SmolLM2-135M, prompt {n_src} tokens, target {n_tgt} tokens, "
          f"{2 if args.quick else n_tgt} steps attributed, target logit, {args.rounds} round(s)")
    runs = {
        "input_x_gradient": lambda: input_x_gradient(model, batch, logit, **rng),
        "attnlrp": lambda: attnlrp(model, batch, logit, **rng),
        "saliency": lambda: saliency(model, batch, logit, **rng),
        "cp_lrp": lambda: cp_lrp(model, batch, logit, **rng),
        f"integrated_gradients (n_steps={args.ig_steps})": lambda: integrated_gradients(
            model, batch, logit, n_steps=args.ig_steps, method="gausslegendre", **rng),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            wall, cpu, out = timed(run)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
            del out
    base_wall, base_cpu = best["input_x_gradient"]
    for name, (wall, cpu) in best.items():
        print(f"{name:36s} cpu {cpu:7.2f}s ({cpu / base_cpu:5.2f}x ixg)  wall {wall:7.2f}s "
              f"({wall / base_wall:5.2f}x ixg)", flush=True)
    ratio = best["attnlrp"][1] / base_cpu
    print(f"AttnLRP / input x gradient = {ratio:.2f}x CPU seconds (goal <= 1.5x): "
          f"{'met' if ratio <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()

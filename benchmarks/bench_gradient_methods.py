"""Gradient and layer methods on SmolLM2-135M: time of each, relative to IG in the same run.

Run: OMP_NUM_THREADS=1 python -m benchmarks.bench_gradient_methods [--n-steps 4] [--last 2]
20 prompt + 20 forced target tokens. `--last K` attributes only the last K target steps (every
method reads the whole sequence either way; fewer steps make the batched backward cheaper) so the
run fits in a few minutes on a small CPU; `--last 0` attributes all 20. Every ratio compares runs
made in this one process, with the same n_steps for IG, DIG and SIG.
"""

import argparse
import time

import fnattr
from benchmarks._common import PROMPT, TARGET, load
from fnattr.methods import (
    deeplift, discretized_integrated_gradients, gradient_shap, integrated_gradients,
    layer_deeplift, layer_gradient_x_activation, layer_integrated_gradients,
    sequential_integrated_gradients,
)
from fnattr.targets import logprob


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-steps", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--last", type=int, default=2)
    parser.add_argument("--skip-sig", action="store_true")
    args = parser.parse_args()
    model, tok = load()
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    rng = {"attr_pos_start": -args.last} if args.last else {}
    n, ibs = args.n_steps, 64
    mid = f"model.layers.{model.config.num_hidden_layers // 2}"
    print(f"SmolLM2-135M, prompt {batch.source_ids.shape[1]} tokens, target {batch.target_ids.shape[1]} "
          f"tokens, {args.last or batch.target_ids.shape[1]} steps attributed, n_steps={n}, "
          f"target logprob")
    runs = [
        ("integrated_gradients", lambda: integrated_gradients(model, batch, logprob, n_steps=n,
                                                              internal_batch_size=ibs, **rng)),
        ("layer_integrated_gradients (embeddings)", lambda: layer_integrated_gradients(
            model, batch, logprob, n_steps=n, internal_batch_size=ibs, **rng)),
        (f"layer_integrated_gradients ({mid})", lambda: layer_integrated_gradients(
            model, batch, logprob, layer=mid, n_steps=n, internal_batch_size=ibs, **rng)),
        (f"layer_gradient_x_activation ({mid})", lambda: layer_gradient_x_activation(
            model, batch, logprob, layer=mid, **rng)),
        ("deeplift", lambda: deeplift(model, batch, logprob, **rng)),
        (f"layer_deeplift ({mid})", lambda: layer_deeplift(model, batch, logprob, layer=mid, **rng)),
        (f"gradient_shap (n_samples={args.n_samples})", lambda: gradient_shap(
            model, batch, logprob, n_samples=args.n_samples, stdevs=0.01, internal_batch_size=ibs, **rng)),
        ("discretized_integrated_gradients", lambda: discretized_integrated_gradients(
            model, batch, logprob, n_steps=n, internal_batch_size=ibs, **rng)),
    ]
    if not args.skip_sig:
        runs.append(("sequential_integrated_gradients", lambda: sequential_integrated_gradients(
            model, batch, logprob, n_steps=n, internal_batch_size=ibs, **rng)))
    times = {}
    for name, run in runs:
        seconds, out = timed(run)
        times[name] = seconds
        delta = "" if out.delta is None else f"  max |delta| {float(out.delta.abs().max()):.1e}"
        print(f"{name:48s} {seconds:7.2f}s  {seconds / times['integrated_gradients']:5.2f}x IG{delta}",
              flush=True)
    ig = times["integrated_gradients"]
    print(f"DIG / IG = {times['discretized_integrated_gradients'] / ig:.2f} (same n_steps={n})")
    if not args.skip_sig:
        print(f"SIG / IG = {times['sequential_integrated_gradients'] / ig:.2f} (same n_steps={n}; "
              f"SIG moves each of the {batch.source_ids.shape[1] + batch.target_ids.shape[1] - 2} "
              "ordinary tokens alone)")


if __name__ == "__main__":
    main()

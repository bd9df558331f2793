"""Cost of a converged IG: n_steps="auto" (per-step refinement to 5 %) against fixed n_steps=50.

Run: python -m benchmarks.bench_convergence [--prompt demo|long] [--target-fn probability]
On SmolLM2 with the default baseline ("auto"). Prints, for each setting, wall and CPU seconds
measured in this one process, the points each step used, and how many steps meet
|delta| <= 5 % of |f(x) - f(baseline)|; the last line is the ratio auto / fixed.
"""

import argparse
import json
import warnings

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load, timed
from fnattr.methods import integrated_gradients
from fnattr.methods._path.refine import ConvergenceWarning


def summary(name: str, wall: float, cpu: float, out) -> str:
    info = json.loads(out.meta["completeness"])
    real = out.step_mask[0].tolist()
    rel = [r for r, ok in zip(info["relative_error"][0], real) if ok]
    points = info["points"] if isinstance(info["points"], int) else info["points"][0]
    met = sum(r <= info["tolerance"] for r in rel)
    return (f"{name:<22} wall {wall:7.1f}s  cpu {cpu:7.1f}s  steps within 5%: {met}/{len(rel)}  "
            f"max rel |delta| {max(rel):.3g}  points per step: {points}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", choices=["demo", "long"], default="demo")
    parser.add_argument("--target-fn", default="probability", choices=["probability", "logprob"])
    parser.add_argument("--fixed", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load()
    if args.prompt == "demo":  # the README demo: 8 greedy tokens after "The capital of France is"
        batch = fnattr.prepare(model, tok, "The capital of France is", max_new_tokens=8)
    else:  # 20 prompt + 20 forced tokens, as the other benchmarks
        batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    target_fn = fnattr.targets.TARGETS[args.target_fn]
    print(f"SmolLM2-135M, {batch.source_ids.shape[1]} prompt + {batch.target_ids.shape[1]} target "
          f"tokens, target {args.target_fn}, baseline auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        auto = timed(lambda: integrated_gradients(model, batch, target_fn))
    fixed = timed(lambda: integrated_gradients(model, batch, target_fn, n_steps=args.fixed))
    print(f"baseline used: {auto[2].meta.get('baseline', '?')}")
    print(summary('n_steps="auto"', *auto))
    print(summary(f"n_steps={args.fixed}", *fixed))
    print(f"auto / fixed: wall {auto[0] / fixed[0]:.2f}x  cpu {auto[1] / fixed[1]:.2f}x")


if __name__ == "__main__":
    main()

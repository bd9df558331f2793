"""IG's n_steps="auto" rules on more inputs than one: the eight benchmark prompts, each with its
own greedy continuation (`--new-tokens`, default 8, as the demo), the default baseline.

Run: python -m benchmarks.bench_rules [--rules gausslegendre adaptive] [--new-tokens 8]
SmolLM2-135M, target probability. For each prompt the rules run one after the other (interleaved
across prompts, so that the machine's drift falls on every rule alike); printed per prompt and in
total: the steps within 5 % of |f(x) - f(baseline)|, the points they used, and the CPU seconds of
this process (`time.process_time`), with each rule's total CPU time against the first rule's.
"""

import argparse
import json
import warnings

import torch

import fnattr
from benchmarks._common import PROMPTS, load, timed
from fnattr.methods import integrated_gradients
from fnattr.methods._path.refine import ConvergenceWarning
from fnattr.methods._path.quadrature import RULES

TOLERANCE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", nargs="+", default=["gausslegendre", "adaptive"],
                        choices=[*RULES, "adaptive"])
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load()
    totals = {rule: [0.0, 0, 0, 0] for rule in args.rules}  # cpu, steps within, steps, points
    print(f"SmolLM2-135M, {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each, target "
          f"probability, default baseline; torch threads {torch.get_num_threads()}", flush=True)
    for prompt in PROMPTS:
        batch = fnattr.prepare(model, tok, [prompt], max_new_tokens=args.new_tokens)
        for rule in args.rules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                _, cpu, out = timed(lambda: integrated_gradients(model, batch, method=rule,
                                                                 tolerance=TOLERANCE))
            info = json.loads(out.meta["completeness"])
            real = out.step_mask[0].tolist()
            rel = [r for r, ok in zip(info["relative_error"][0], real) if ok]
            points = [p for p, ok in zip(info["points"][0], real) if ok]
            met = sum(r <= TOLERANCE for r in rel)
            total = totals[rule]
            total[0] += cpu
            total[1] += met
            total[2] += len(rel)
            total[3] += sum(points)
            print(f"{prompt[:34]!r:38} {rule:<14} cpu {cpu:6.1f}s  within 5%: {met}/{len(rel)}  "
                  f"max {max(rel):7.3f}  points {points}", flush=True)
    first = args.rules[0]
    for rule, (cpu, met, steps, points) in totals.items():
        print(f"total {rule:<14} cpu {cpu:7.1f}s  steps within 5%: {met}/{steps}  points {points}  "
              f"{first} / {rule}: {totals[first][0] / cpu:4.2f}x less CPU time", flush=True)


if __name__ == "__main__":
    main()

"""Integrated gradients at equal accuracy: the cost of bringing every step's completeness error
to |delta| <= 5 % of |f(x) - f(baseline)|, per quadrature rule, against the peer's default.

Run: python -m benchmarks.bench_equal_accuracy [--peer .peer/bin/python] [--rules ...]
SmolLM2-135M, PROMPT + TARGET (20 + 20 tokens), target probability, and inseq's own baseline
(the UNK token at every position) for both libraries, so that the errors are comparable.

Prints, each measured in this one run (CPU seconds of each process, `time.process_time`):
- the peer, inseq 0.7.1, with its default IG (gausslegendre, 50 points): its CPU seconds and
  its steps' completeness errors (from captum's convergence delta);
- fnattr with the same 50 points: the same errors (a check that both compute one integral) and
  its CPU seconds;
- fnattr with n_steps="auto" for each rule: the points each step needed (8, 16, ... per step,
  refined only where a step misses 5 %), how many steps met 5 %, and the CPU seconds;
- the ratios: the peer's default against fnattr's auto, per rule.
"""

import argparse
import json
import subprocess
import warnings
from collections import Counter

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load, timed
from fnattr.methods import integrated_gradients
from fnattr.methods._converge import ConvergenceWarning
from fnattr.methods._paths import RULES

TOLERANCE = 0.05


def errors(out) -> tuple[list[float], list[int]]:
    """Each real step's relative completeness error and the points it used."""
    info = json.loads(out.meta["completeness"])
    real = out.step_mask[0].tolist()
    points = info["points"] if isinstance(info["points"], int) else info["points"][0]
    points = points if isinstance(points, list) else [points] * len(real)
    return ([r for r, ok in zip(info["relative_error"][0], real) if ok],
            [p for p, ok in zip(points, real) if ok])


def line(name: str, cpu: float, wall: float, rel: list[float], points: list[int] | None) -> str:
    met = sum(r <= TOLERANCE for r in rel)
    used = "" if points is None else "  points per step: " + ", ".join(
        f"{p} x{n}" for p, n in sorted(Counter(points).items()))
    return (f"{name:<34} cpu {cpu:7.1f}s  wall {wall:6.1f}s  steps within 5%: {met:2d}/{len(rel)}  "
            f"max {max(rel):6.3f}  median {sorted(rel)[len(rel) // 2]:6.3f}{used}")


def peer(python: str, n_steps: int) -> dict:
    from fnattr.loading import default_model_path, gguf_cache_path

    out = subprocess.run([python, "benchmarks/peer_inseq.py", str(gguf_cache_path(default_model_path())),
                          "convergence", str(n_steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", help="python of a venv with inseq 0.7.1 (e.g. .peer/bin/python)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--fixed", type=int, default=50, help="the peer's default n_steps")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load()
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    print(f"SmolLM2-135M, {batch.source_ids.shape[1]} prompt + {batch.target_ids.shape[1]} target "
          f"tokens, target probability, baseline UNK ({tok.unk_token!r}) at every position; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    ig = {"baseline": "unk", "tolerance": TOLERANCE}
    rows = {}
    if args.peer:
        theirs = peer(args.peer, args.fixed)
        rows["peer"] = theirs["cpu"]
        print(line(f"inseq 0.7.1 IG, n_steps={args.fixed}", theirs["cpu"], theirs["wall"],
                   theirs["relative_error"], None), flush=True)
    wall, cpu, out = timed(lambda: integrated_gradients(model, batch, n_steps=args.fixed, **ig))
    rows["fixed"] = cpu
    print(line(f"fnattr IG, n_steps={args.fixed}", cpu, wall, *errors(out)), flush=True)
    if args.peer:
        gap = max(abs(a - b) for a, b in zip(errors(out)[0], theirs["relative_error"]))
        print(f"  same integral: largest difference of a step's relative error, fnattr - inseq: "
              f"{gap:.2e}", flush=True)
    for rule in args.rules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            wall, cpu, out = timed(lambda: integrated_gradients(model, batch, method=rule, **ig))
        rows[rule] = cpu
        print(line(f'fnattr IG, n_steps="auto", {rule}', cpu, wall, *errors(out)), flush=True)
    ref, name = (rows["peer"], "inseq's default") if args.peer else (rows["fixed"], f"n_steps={args.fixed}")
    for rule in args.rules:
        print(f"{name} / fnattr auto {rule:<18}: {ref / rows[rule]:5.1f}x less CPU time")


if __name__ == "__main__":
    main()

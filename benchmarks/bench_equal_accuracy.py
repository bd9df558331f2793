"""Integrated gradients at equal accuracy: the cost of bringing every step's completeness error
to |delta| <= 5 % of |f(x) - f(baseline)|, per quadrature rule, against the peer's default.

Run: python -m benchmarks.bench_equal_accuracy [--peer .peer/bin/python] [--rules ...]
[--method layer_integrated_gradients] (layer IG at the embedding layer, fnattr only: inseq 0.7.1's
layer IG on SmolLM2 returns all-zero scores with zero delta: no accuracy to match)
SmolLM2-135M, PROMPT + TARGET (20 + 20 tokens), target probability, and inseq's own baseline
(the UNK token at every position) for both libraries, so that the errors are comparable.

Prints, each measured in this one run (CPU seconds of each process, `time.process_time`):
- the peer, inseq 0.7.1, with its default IG (gausslegendre, 50 points) and with each of
  `--peer-steps` (e.g. 128, the cap of fnattr's auto): its CPU seconds and its steps'
  completeness errors (from captum's convergence delta);
- fnattr with the same 50 points: the same errors (a check that both compute one integral) and
  its CPU seconds;
- fnattr with n_steps="auto" for each rule: the points each step needed (8, 16, ... per step,
  refined only where a step misses 5 %), how many steps met 5 %, and the CPU seconds; and
  method="adaptive" (`fnattr.methods._path.adaptive`: each step's mesh halved where its intervals'
  completeness fails), with the memory its node gradients held at most against all it computed;
- for the rules whose levels nest (riemann_trapezoid: 8, 15, 29, 57, 113 points; riemann_left and
  riemann_right: 8, 16, ... 128), the same refinement with every level recomputed whole
  (`_converge.REUSE_POINTS = False`): its CPU seconds, the ratio, and the largest difference of
  the scores (the same points, so float rounding only);
- the ratios: each peer run against fnattr's auto, per rule, with the steps each met 5 % on.

`--profile N` prints instead the integrand at N equal points of the path: per step, the
derivative g(a) = d f(baseline + a (x - baseline)) / da at its largest and where g changes most
between neighbouring points (why fixed spacings need many points here).
"""

import argparse
import contextlib
import json
import subprocess
import warnings
import weakref
from collections import Counter
from unittest import mock

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load, timed
from fnattr.methods import integrated_gradients, layer_integrated_gradients
from fnattr.methods._path import adaptive as _adaptive
from fnattr.methods._path import refine as _converge
from fnattr.methods._path import quadrature as _paths
from fnattr.methods.integrated_gradients import baselines
from fnattr.targets import probability
from fnattr.methods._path.refine import ConvergenceWarning
from fnattr.methods._path.quadrature import RULES

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


@contextlib.contextmanager
def node_memory():
    """For method="adaptive": the most bytes of node gradients alive at once (a round's new
    nodes with those of the steps still refining; a finished step's are freed) and the bytes of
    all nodes computed."""
    refs, memory = [], {"peak": 0, "made": 0}
    real = _adaptive._evaluate

    def spy(*args):
        alive = sum(g.nbytes for r in refs if (g := r()) is not None)
        got = real(*args)
        grads = [g for n in got.values() for g in n.grads if g is not None]
        new = sum(g.nbytes for g in grads)
        memory["peak"], memory["made"] = max(memory["peak"], alive + new), memory["made"] + new
        refs.extend(map(weakref.ref, grads))
        return got

    with mock.patch.object(_adaptive, "_evaluate", spy):
        yield memory


def profile(model, batch, n: int) -> None:
    """f and g = df/da of every step at n equal points of the UNK path (`_adaptive._evaluate`)."""
    from fnattr.attribution import attribution_context
    from fnattr.progress import OFF

    alphas = [i / (n - 1) for i in range(n)]
    with (warnings.catch_warnings(), attribution_context(model, batch, attribute_target=None,
                                                         attr_pos_start=None, attr_pos_end=None) as ctx):
        warnings.simplefilter("ignore")
        x = (ctx.embedded.source, ctx.embedded.target)
        base = baselines(ctx, "unk")
        steps = set(range(len(ctx.steps)))
        wanted = {(0, a): steps for a in alphas}
        diffs = [x[0] - base[0], None]
        nodes = _adaptive._evaluate(ctx, _adaptive.ig_node(probability, x, base), diffs, wanted, 16, OFF)
    print(f"the integrand of each step at {n} equal points of the path")
    for k in sorted(steps):
        g = [nodes[0, k, a].g for a in alphas]
        jump = max(range(n - 1), key=lambda i: abs(g[i + 1] - g[i]))
        f = nodes[0, k, alphas[-1]].f - nodes[0, k, alphas[0]].f
        print(f"step {k:2d}: f(x) - f(baseline) {f:+.2e}  max |g| {max(map(abs, g)):8.3f}  largest "
              f"change of g between neighbours {g[jump]:+8.3f} -> {g[jump + 1]:+8.3f} at a = "
              f"{alphas[jump]:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", help="python of a venv with inseq 0.7.1 (e.g. .peer/bin/python)")
    parser.add_argument("--rules", nargs="+", default=[*RULES, "adaptive"], choices=[*RULES, "adaptive"])
    parser.add_argument("--fixed", type=int, default=50, help="the peer's default n_steps")
    parser.add_argument("--peer-steps", nargs="*", type=int, default=[128],
                        help="more n_steps to run the peer with (its cost at fnattr's cap)")
    parser.add_argument("--baseline", default="unk",
                        help="fnattr's baseline (the peer runs only with 'unk', its own)")
    parser.add_argument("--method", default="integrated_gradients",
                        choices=["integrated_gradients", "layer_integrated_gradients"],
                        help="IG, or layer IG (fnattr only; at --layer)")
    parser.add_argument("--layer", default=None, help="layer IG's layer (default: the embeddings)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the integrand at N equal points instead")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load()
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    if args.profile:
        return profile(model, batch, args.profile)
    said = f"UNK ({tok.unk_token!r}) at every position" if args.baseline == "unk" else args.baseline
    print(f"SmolLM2-135M, {batch.source_ids.shape[1]} prompt + {batch.target_ids.shape[1]} target "
          f"tokens, target probability, baseline {said}; torch threads {torch.get_num_threads()}",
          flush=True)
    ig = {"baseline": args.baseline, "tolerance": TOLERANCE}
    run = integrated_gradients
    if args.method == "layer_integrated_gradients":
        run, ig["layer"] = layer_integrated_gradients, args.layer
    short = "IG" if run is integrated_gradients else "layer IG"
    print(f"method: {args.method}" + ("" if run is integrated_gradients else
                                       f" at {args.layer or 'the input embeddings (its default layer)'}"))
    rows, peers = {}, []
    if args.peer and args.baseline == "unk" and run is integrated_gradients:
        for n in [args.fixed, *args.peer_steps]:
            theirs = peer(args.peer, n)
            rel = theirs["relative_error"]
            peers.append((f"inseq n_steps={n}", theirs["cpu"], sum(r <= TOLERANCE for r in rel)))
            print(line(f"inseq 0.7.1 {short}, n_steps={n}", theirs["cpu"], theirs["wall"], rel, None),
                  flush=True)
            if n == args.fixed:
                default = theirs
    wall, cpu, out = timed(lambda: run(model, batch, n_steps=args.fixed, **ig))
    rows["fixed"] = (cpu, sum(r <= TOLERANCE for r in errors(out)[0]))
    steps = len(errors(out)[0])
    print(line(f"fnattr {short}, n_steps={args.fixed}", cpu, wall, *errors(out)), flush=True)
    if peers:
        gap = max(abs(a - b) for a, b in zip(errors(out)[0], default["relative_error"]))
        print(f"  same integral: largest difference of a step's relative error, fnattr - inseq: "
              f"{gap:.2e}", flush=True)

    def auto(rule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return timed(lambda: run(model, batch, method=rule, **ig))

    for rule in args.rules:
        with node_memory() as memory:
            wall, cpu, out = auto(rule)
        rows[rule] = (cpu, sum(r <= TOLERANCE for r in errors(out)[0]))
        name = "method='adaptive'" if rule == "adaptive" else f'n_steps="auto", {rule}'
        print(line(f"fnattr {short}, {name}", cpu, wall, *errors(out)), flush=True)
        if memory["made"]:
            print(f"  node gradients: at most {memory['peak'] / 2**20:.1f} MiB alive at once, of "
                  f"{memory['made'] / 2**20:.1f} MiB computed", flush=True)
        if rule == "adaptive" or _paths.next_level(rule, _converge.AUTO_START) is None:
            continue
        with mock.patch.object(_converge, "REUSE_POINTS", False):
            wall, whole, again = auto(rule)
        print(line("  the same, each level recomputed", whole, wall, *errors(again)), flush=True)
        gap = max(float((a - b).abs().max() / b.abs().max())
                  for a, b in ((out.source, again.source), (out.target, again.target)))
        print(f"  reusing the last level's points: {whole / cpu:.2f}x less CPU time; largest "
              f"score difference {gap:.1e} of the largest score", flush=True)
    refs = peers or [(f"fnattr n_steps={args.fixed}", *rows["fixed"])]
    for ref, ref_cpu, ref_met in refs:
        for rule in args.rules:
            cpu, met = rows[rule]
            print(f"{ref:<18} ({ref_met:2d}/{steps} within 5%) / fnattr {rule:<18} ({met:2d}/{steps}): "
                  f"{ref_cpu / cpu:5.2f}x less CPU time")


if __name__ == "__main__":
    main()

"""Triangular backward (`fnattr.methods._triangular`) against one whole forward, on a CPU.

Run: python -m benchmarks.bench_triangular [--n-steps 8] [--only "layer IG"]. SmolLM2-135M; every ratio compares
runs made in this one process, interleaved (tri, whole, tri, whole), by CPU seconds
(`time.process_time`) next to wall seconds. Prints, per method and input, the pieces the cost
model chose, the best CPU time of each path, their ratio and the largest relative difference of
the scores; then a batch of 8 prompts against 8 single calls, both with the default path.
"""

import argparse
from unittest import mock

import torch

import fnattr
from benchmarks._common import PROMPT, PROMPTS, TARGET, load, timed
from fnattr.methods import _triangular, integrated_gradients, layer_integrated_gradients, saliency


LAYER = "model.layers.15"  # SmolLM2-135M has 30 blocks


def whole_forward():
    """The one forward and batched backward of `engine.step_gradients`, for comparison."""
    return mock.patch.object(_triangular, "plan", lambda *a, **k: None)


def compare(name: str, run, n_rows: int, ctx_batch) -> None:
    cpu = {"tri": [], "whole": []}
    wall = {"tri": [], "whole": []}
    outs = {}
    for _ in range(2):
        for kind in ("tri", "whole"):
            if kind == "whole":
                with whole_forward():
                    w, c, out = timed(run)
            else:
                w, c, out = timed(run)
            cpu[kind].append(c)
            wall[kind].append(w)
            outs[kind] = out
    a, b = outs["tri"].source, outs["whole"].source
    diff = float((a - b).abs().max() / b.abs().max())
    n_src, n_tgt = ctx_batch.source_ids.shape[1], ctx_batch.target_ids.shape[1]
    cap = max(1, fnattr.engine.CPU_COPIES_PER_BACKWARD // n_rows)
    chosen = _triangular.pieces([n_src + k for k in range(n_tgt)], n_rows, cap)
    print(f"{name:34s} pieces {len(chosen)}  cpu tri {min(cpu['tri']):6.2f}s whole "
          f"{min(cpu['whole']):6.2f}s  ratio {min(cpu['whole']) / min(cpu['tri']):4.2f}x  (wall "
          f"{min(wall['whole']) / min(wall['tri']):4.2f}x)  max rel diff {diff:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-steps", type=int, default=8)
    parser.add_argument("--only", default="", help="run the lines whose name holds this text")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load()
    one = fnattr.prepare(model, tok, PROMPT, TARGET)
    eight = fnattr.prepare(model, tok, PROMPTS, [TARGET] * len(PROMPTS))
    ig = {"n_steps": args.n_steps, "internal_batch_size": 64}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; 1 prompt "
          f"{one.source_ids.shape[1]}+{one.target_ids.shape[1]} tokens, 8 prompts "
          f"{eight.source_ids.shape[1]}+{eight.target_ids.shape[1]} (padded)")
    n = args.n_steps
    runs = [  # (name, run, copies per chunk, batch)
        ("saliency, 1 prompt", lambda: saliency(model, one), 1, one),
        ("saliency, 8 prompts", lambda: saliency(model, eight), 8, eight),
        (f"IG({n}), 1 prompt", lambda: integrated_gradients(model, one, **ig), n, one),
        (f"IG({n}), 8 prompts", lambda: integrated_gradients(model, eight, **ig), min(64, 8 * n), eight),
        # layer IG at a middle block: the layer's interpolated outputs read piece by piece
        (f"layer IG({n}) at {LAYER}, 1 prompt",
         lambda: layer_integrated_gradients(model, one, layer=LAYER, **ig), n, one),
        (f"layer IG({n}) at {LAYER}, 8 prompts",
         lambda: layer_integrated_gradients(model, eight, layer=LAYER, **ig), min(64, 8 * n), eight),
    ]
    for name, run, copies, batch in runs:
        if args.only in name:
            compare(name, run, copies, batch)
    singles = [fnattr.prepare(model, tok, p, TARGET) for p in PROMPTS]
    for name, fn, kw in (("saliency", saliency, {}), (f"IG({n})", integrated_gradients, ig),
                         (f"layer IG({n})", layer_integrated_gradients, {**ig, "layer": LAYER})):
        if args.only not in name:
            continue
        batch = timed(lambda: fn(model, eight, **kw))[1]
        alone = timed(lambda: [fn(model, b, **kw) for b in singles])[1]
        print(f"{name:12s} batch of 8: cpu {batch:6.2f}s  8 single calls: cpu {alone:6.2f}s  "
              f"batch is {alone / batch:4.2f}x faster", flush=True)


if __name__ == "__main__":
    main()

"""Core benchmark: one-pass saliency and IG vs a per-step loop, batch of 8 vs 8 single calls.

Run: python -m benchmarks.bench_core [--n-steps 16]. Every ratio compares runs made in this one
process (or its children, for peak memory), on SmolLM2-135M, 20 prompt + 20 forced target tokens.
"""

import argparse
import json
import subprocess
import sys

import torch

import fnattr
from benchmarks._common import (PROMPT, PROMPTS, TARGET, best_time, in_subprocess, load, n_tokens,
                                peak_rss_mb, reset_peak_rss)
from fnattr.methods import integrated_gradients, saliency


def per_step_loop(method, model, tok, **kwargs):
    """The same computation, one step at a time: step t runs on the prefix it reads only."""
    full = fnattr.prepare(model, tok, PROMPT, TARGET)
    ids = full.target_ids[0].tolist()
    outs = []
    for t in range(len(ids)):
        batch = fnattr.prepare(model, tok, PROMPT, tok.decode(ids[: t + 1]))
        assert batch.target_ids[0].tolist() == ids[: t + 1], "prefix does not re-tokenize the same"
        outs.append(method(model, batch, attr_pos_start=t, attr_pos_end=t + 1, **kwargs))
    return outs


def max_rel_diff(one_pass, loop) -> float:
    worst = 0.0
    for t, out in enumerate(loop):
        a, b = one_pass.source[0, t], out.source[0, 0]
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def one_pass_vs_loop(model, tok, n_steps: int) -> dict:
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    times = {}
    print(f"prompt {batch.source_ids.shape[1]} tokens, target {batch.target_ids.shape[1]} tokens")
    for name, method, kwargs in (("saliency", saliency, {}),
                                 ("integrated_gradients", integrated_gradients,
                                  {"n_steps": n_steps, "internal_batch_size": 16})):
        t_one = best_time(lambda: method(model, batch, **kwargs))
        t_loop = best_time(lambda: per_step_loop(method, model, tok, **kwargs), repeat=1)
        diff = max_rel_diff(method(model, batch, **kwargs), per_step_loop(method, model, tok, **kwargs))
        print(f"{name:22s} one-pass {t_one:6.2f}s  per-step loop {t_loop:6.2f}s  "
              f"speed-up {t_loop / t_one:5.1f}x  max rel diff {diff:.1e}")
        times[f"{name}_single"] = t_one
    return times


def child(kind: str, method: str, n_steps: int, ibs: int) -> None:
    """Child process: run one configuration, print time and peak RSS as JSON."""
    model, tok = load()
    reset_peak_rss()
    base_rss = peak_rss_mb()
    fn = {"saliency": saliency, "integrated_gradients": integrated_gradients}[method]
    kwargs = {} if method == "saliency" else {"n_steps": n_steps, "internal_batch_size": ibs}
    targets = [TARGET] * len(PROMPTS)
    if kind in ("batch", "one"):
        batch = fnattr.prepare(model, tok, PROMPTS if kind == "batch" else PROMPTS[:1],
                               targets if kind == "batch" else targets[:1])
        run = lambda: fn(model, batch, **kwargs)  # noqa: E731
    else:
        singles = [fnattr.prepare(model, tok, p, t) for p, t in zip(PROMPTS, targets)]
        run = lambda: [fn(model, b, **kwargs) for b in singles]  # noqa: E731
    seconds = best_time(run, repeat=1)
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "model_mb": base_rss}))


def batch_vs_singles(n_steps: int) -> dict:
    times = {}
    for method in ("saliency", "integrated_gradients"):
        res = {k: in_subprocess("benchmarks.bench_core", "--child", k, method, str(n_steps), "64")
               for k in ("batch", "single")}
        print(f"{method:22s} batch of 8 {res['batch']['seconds']:6.2f}s  8 single calls "
              f"{res['single']['seconds']:6.2f}s  speed-up {res['single']['seconds'] / res['batch']['seconds']:4.1f}x  "
              f"peak RSS {res['batch']['peak_mb']:.0f} MB vs {res['single']['peak_mb']:.0f} MB "
              f"(model loaded: {res['batch']['model_mb']:.0f} MB)")
        times[f"{method}_batch8"] = res["batch"]["seconds"]
        times[f"{method}_8_singles"] = res["single"]["seconds"]
    return times


def peer(python: str, n_steps: int, ours: dict) -> None:
    """inseq 0.7.1 in its own venv, same model (fnattr's safetensors cache) and inputs."""
    from fnattr.loading import default_model_path, gguf_cache_path

    out = subprocess.run([python, "benchmarks/peer_inseq.py", str(gguf_cache_path(default_model_path())),
                          str(n_steps)], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for key in sorted(ours):
        print(f"vs inseq 0.7.1  {key:32s} fnattr {ours[key]:6.2f}s  inseq {theirs[key]:6.2f}s  "
              f"fnattr is {theirs[key] / ours[key]:5.1f}x faster")


def ig_memory_vs_steps() -> None:
    rows = []
    for n_steps in (16, 64):
        r = in_subprocess("benchmarks.bench_core", "--child", "one", "integrated_gradients", str(n_steps), "16")
        rows.append((n_steps, r))
    print("IG, one prompt, internal_batch_size=16: " + ", ".join(
        f"n_steps={n}: {r['seconds']:.1f}s peak {r['peak_mb']:.0f} MB" for n, r in rows)
        + f"  -> peak ratio {rows[1][1]['peak_mb'] / rows[0][1]['peak_mb']:.2f} for 4x the steps")


def peer_occlusion(python: str, model, tok) -> None:
    """Occlusion of 9 generated tokens, fnattr and inseq 0.7.1 on the same model, in one run."""
    from fnattr.loading import default_model_path, gguf_cache_path

    batch = fnattr.prepare(model, tok, PROMPT, max_new_tokens=9)
    ours = best_time(lambda: fnattr.methods.occlusion(model, batch), repeat=1)
    out = subprocess.run([python, "benchmarks/peer_inseq.py", str(gguf_cache_path(default_model_path())),
                          "occlusion"], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])["occlusion_9_generated"]
    print(f"vs inseq 0.7.1  occlusion, 9 generated tokens      fnattr {ours:6.2f}s  inseq {theirs:6.2f}s  "
          f"fnattr is {theirs / ours:5.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-steps", type=int, default=8)
    parser.add_argument("--peer", help="python of a venv with inseq 0.7.1 (e.g. .peer/bin/python)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "METHOD", "N_STEPS", "IBS"))
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    if args.child:
        kind, method, n_steps, ibs = args.child
        child(kind, method, int(n_steps), int(ibs))
        return
    model, tok = load()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"prompt tokens {n_tokens(tok, PROMPT, True)}, target tokens {n_tokens(tok, TARGET, False)}")
    ours = one_pass_vs_loop(model, tok, args.n_steps)
    ours |= batch_vs_singles(args.n_steps)
    ig_memory_vs_steps()
    if args.peer:
        peer(args.peer, args.n_steps, ours)
        peer_occlusion(args.peer, model, tok)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

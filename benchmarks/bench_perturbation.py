"""Perturbation benchmark: attention, occlusion and LIME in one pass vs a per-step loop.

Run: python -m benchmarks.bench_perturbation [--lime-samples 16] [--device cuda]. SmolLM2-135M,
20 prompt + 20 forced target tokens, plus occlusion on 9 generated tokens (the peer's case), and
(`--only prefix`) perturbations from the clean key/value cache against whole forwards and captum.
Every ratio compares runs made in this one process; the per-step loop runs the same method once
per generated token, on the prefix that token reads only (so one run per step, as the peer does).
"""

import argparse
import contextlib
import time

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load
from fnattr.methods import _prefix, attention, lime, occlusion


def per_step_loop(method, model, tok, batch, **kwargs):
    """`method` once per step t, on the prompt and target[:t + 1] (re-tokenized identically)."""
    ids = batch.target_ids[0].tolist()
    outs = []
    for t in range(len(ids)):
        prefix = fnattr.prepare(model, tok, batch.sources[0], tok.decode(ids[: t + 1]))
        assert prefix.target_ids[0].tolist() == ids[: t + 1], "prefix does not re-tokenize the same"
        outs.append(method(model, prefix, attr_pos_start=t, attr_pos_end=t + 1, **kwargs))
    return outs


def max_rel_diff(one_pass, loop) -> float:
    """Largest difference between step t of the one-pass run and the loop's run t, relative to
    the largest score of that step, over source and target scores."""
    worst = 0.0
    for t, out in enumerate(loop):
        pairs = [(one_pass.source[0, t], out.source[0, 0])]
        if out.target is not None:
            pairs.append((one_pass.target[0, t, : t + 1], out.target[0, 0]))
        scale = max(float(b.abs().max()) for _, b in pairs) or 1.0
        worst = max(worst, max(float((a - b).abs().max()) for a, b in pairs) / scale)
    return worst


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(name, method, model, tok, batch, **kwargs) -> float:
    method(model, batch, **kwargs)  # warm-up
    t_one, one = timed(lambda: method(model, batch, **kwargs))
    t_loop, loop = timed(lambda: per_step_loop(method, model, tok, batch, **kwargs))
    print(f"{name:28s} one-pass {t_one:7.2f}s  per-step loop {t_loop:7.2f}s  "
          f"speed-up {t_loop / t_one:5.1f}x  max rel diff {max_rel_diff(one, loop):.1e}", flush=True)
    return t_one


def cpu_timed(fn):
    """(wall s, CPU s of this process, result): CPU seconds are what a shared machine skews least."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def whole_forwards(fn):
    """`fn()` with the prefix cache off: every perturbed copy runs the whole input (as before)."""
    saved = _prefix.prefix
    _prefix.prefix = lambda ctx, target_fn, masks=None: None
    try:
        return fn()
    finally:
        _prefix.prefix = saved


def prefix_reuse(model, tok, batch, ibs: int, rounds: int = 2) -> None:
    """Occlusion and LIME from the clean key/value cache against whole forwards per copy, and
    occlusion of the prompt against captum's FeatureAblation (LLMAttribution, same baseline
    token), interleaved `rounds` times; best CPU and wall of each."""
    runs = {
        "occlusion (prefix cache)": lambda: occlusion(model, batch, internal_batch_size=ibs),
        "occlusion (whole forwards)": lambda: whole_forwards(
            lambda: occlusion(model, batch, internal_batch_size=ibs)),
        "lime 64 (prefix cache)": lambda: lime(model, batch, n_samples=64, seed=0, internal_batch_size=ibs),
        "lime 64 (whole forwards)": lambda: whole_forwards(
            lambda: lime(model, batch, n_samples=64, seed=0, internal_batch_size=ibs)),
        "occlusion, prompt only": lambda: occlusion(model, batch, attribute_target=False,
                                                    baseline="unk", internal_batch_size=ibs),
    }
    try:
        from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

        llm = LLMAttribution(FeatureAblation(model), tok)
        inp = TextTokenInput(batch.sources[0], tok, baselines=tok.unk_token_id,
                             skip_tokens=[tok.bos_token_id] if tok.bos_token_id is not None else None)
        runs["captum FeatureAblation, prompt"] = lambda: llm.attribute(inp, target=batch.targets[0])
    except ImportError:
        pass
    best: dict[str, tuple[float, float]] = {}
    outs = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            with torch.no_grad() if name.startswith("captum") else contextlib.nullcontext():
                wall, cpu, outs[name] = cpu_timed(fn)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
    for name, (wall, cpu) in best.items():
        print(f"{name:32s} wall {wall:7.2f}s  cpu {cpu:7.2f}s", flush=True)
    for what in ("occlusion", "lime 64"):
        a, b = outs[f"{what} (prefix cache)"], outs[f"{what} (whole forwards)"]
        diff = float((a.source - b.source).abs().max() / b.source.abs().max())
        fast, slow = best[f"{what} (prefix cache)"], best[f"{what} (whole forwards)"]
        print(f"{what}: prefix cache vs whole forwards  wall {slow[0] / fast[0]:.2f}x  "
              f"cpu {slow[1] / fast[1]:.2f}x faster  max rel diff {diff:.1e}", flush=True)
    if "captum FeatureAblation, prompt" in best:
        ours, peer = best["occlusion, prompt only"], best["captum FeatureAblation, prompt"]
        print(f"occlusion of the prompt vs captum FeatureAblation  wall {peer[0] / ours[0]:.2f}x  "
              f"cpu {peer[1] / ours[1]:.2f}x faster", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lime-samples", type=int, default=16)
    parser.add_argument("--internal-batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="attention,occlusion,lime,generated,prefix",
                        help="comma-separated parts to run (each part alone stays under ~3 min)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    model, tok = load()
    model = model.to(args.device)
    print(f"{type(model).__name__} {model.dtype} on {args.device}, "
          f"{torch.get_num_threads()} CPU threads, attention {model.config._attn_implementation}")
    ibs = args.internal_batch_size
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    if parts & {"attention", "occlusion", "lime"}:
        print(f"forced: prompt {batch.source_ids.shape[1]} tokens, target {batch.target_ids.shape[1]} tokens")
    if "attention" in parts:
        compare("attention", attention, model, tok, batch)
    if "occlusion" in parts:
        compare("occlusion", occlusion, model, tok, batch, internal_batch_size=ibs)
    if "lime" in parts:
        compare(f"lime (n_samples={args.lime_samples})", lime, model, tok, batch,
                n_samples=args.lime_samples, seed=0, internal_batch_size=ibs)
    if "prefix" in parts:
        prefix_reuse(model, tok, batch, ibs)
    if "generated" in parts:
        gen = fnattr.prepare(model, tok, PROMPT, max_new_tokens=9)
        print(f"generated: prompt {gen.source_ids.shape[1]} tokens, {gen.target_ids.shape[1]} generated "
              f"tokens {gen.targets[0]!r} (peer, not run here: 40 s for occlusion of 9 tokens)")
        t_one = compare("occlusion, 9 generated", occlusion, model, tok, gen, internal_batch_size=ibs)
        # the peer's way: a run per step and one forward per occluded position, unbatched
        t_peer, _ = timed(lambda: per_step_loop(occlusion, model, tok, gen, internal_batch_size=1))
        print(f"{'  per-step, 1 forward/position':28s} {t_peer:7.2f}s  speed-up of one-pass "
              f"{t_peer / t_one:5.1f}x", flush=True)


if __name__ == "__main__":
    main()

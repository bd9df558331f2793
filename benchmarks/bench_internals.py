"""Internals benchmark: value zeroing and ReAGent, one pass vs a per-step loop, on SmolLM2-135M.

Run: python -m benchmarks.bench_internals [--target-tokens 20 --probe-steps 2 --num-probes 8]
Every ratio compares runs made in this one process: 20 prompt tokens and the first
`--target-tokens` of the 20 forced target tokens (default 20 on a GPU; 10 on CPU, where the
per-step loops of both methods at 20 tokens take ~5 minutes on one thread; printed).
"""

import argparse
import dataclasses
import time

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load
from fnattr.hooks.value_zeroing import capture_layers, layer_stacks
from fnattr.hooks.value_zeroing import value_zeroing as zeroed_values
from fnattr.methods.reagent import reagent
from fnattr.methods.value_zeroing import distance, value_zeroing


def prefix(batch, t: int):
    """The batch cut after target token t: step t's computation reads nothing beyond it."""
    keep = slice(0, t + 1)
    return dataclasses.replace(
        batch, target_ids=batch.target_ids[:, keep], target_mask=batch.target_mask[:, keep],
        target_special=batch.target_special[:, keep],
        target_tokens=tuple(row[keep] for row in batch.target_tokens))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def per_step(method, model, batch, **kwargs):
    n = batch.target_ids.shape[1]
    return [method(model, prefix(batch, t), attr_pos_start=t, attr_pos_end=t + 1, **kwargs)
            for t in range(n)]


def naive_step_seconds(model, batch, t: int, layer: int) -> float:
    """The peer-style cost unit: one full-model forward for (step t, layer), one row per zeroed
    token of the prefix, hidden state read at that layer."""
    ids = torch.cat([batch.source_ids, batch.target_ids[:, :t]], 1)
    layers = layer_stacks(model)["decoder"]
    seq = ids.shape[1]
    t0 = time.perf_counter()
    with torch.no_grad():
        with capture_layers(layers[layer:layer + 1]) as clean:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        with zeroed_values(model, [layer]) as vz, capture_layers(layers[layer:layer + 1]) as calls:
            vz.zero(torch.eye(seq, dtype=torch.bool))
            model(input_ids=ids.expand(seq, -1), use_cache=False, logits_to_keep=1)
        distance(calls[0].output[:, -1], clean[0].output[:, -1], "cosine")
    return time.perf_counter() - t0


def bench_value_zeroing(model, batch) -> None:
    n_tgt, n_layers = batch.target_ids.shape[1], len(layer_stacks(model)["decoder"])
    one, t_one = timed(lambda: value_zeroing(model, batch))
    loop, t_loop = timed(lambda: per_step(value_zeroing, model, batch))
    diff = max(float((one.source[0, t] - out.source[0, 0]).abs().max()) for t, out in enumerate(loop))
    diff_t = max(float((one.target[0, t, :t] - out.target[0, 0, :t]).abs().max())
                 for t, out in enumerate(loop) if t > 0)
    scale = float(one.source.abs().max())
    print(f"value_zeroing   one-pass {t_one:7.2f}s  per-step loop {t_loop:7.2f}s  "
          f"speed-up {t_loop / t_one:5.1f}x  max abs diff {max(diff, diff_t):.1e} (max score {scale:.1e})")
    # peer-style loop (full forward per step and layer): time two steps, scale by the rows x tokens
    lengths = [batch.source_ids.shape[1] + t for t in range(n_tgt)]
    est = 0.0
    for t in (0, n_tgt - 1):
        sec = naive_step_seconds(model, batch, t, layer=n_layers // 2)
        est += sec / lengths[t] ** 2 / 2
    est *= n_layers * sum(s ** 2 for s in lengths)
    print(f"value_zeroing   full-forward loop per (step, layer), estimated from 2 timed units: "
          f"{est:7.1f}s  -> one-pass speed-up {est / t_one:5.1f}x")


def bench_reagent(model, batch, probe_steps: int, num_probes: int) -> None:
    kwargs = {"max_probe_steps": probe_steps, "num_probes": num_probes, "generator": 0}
    one, t_one = timed(lambda: reagent(model, batch, **kwargs))
    loop, t_loop = timed(lambda: per_step(reagent, model, batch, **kwargs))
    it_one = float(one.step_scores["reagent_probe_steps"].sum())
    it_loop = sum(float(o.step_scores["reagent_probe_steps"].sum()) for o in loop)
    conv = int(one.step_scores["reagent_converged"].sum())
    conv_loop = sum(int(o.step_scores["reagent_converged"].sum()) for o in loop)
    finite = bool(torch.isfinite(one.source).all() and torch.isfinite(one.target).all())
    print(f"reagent         one-pass {t_one:7.2f}s  per-step loop {t_loop:7.2f}s  "
          f"speed-up {t_loop / t_one:5.1f}x  (probe steps x steps run: {it_one:.0f} vs {it_loop:.0f}; "
          f"per probe step {t_loop / max(it_loop, 1) / (t_one / max(it_one, 1)):4.1f}x)  "
          f"converged {conv} vs {conv_loop} of {batch.target_ids.shape[1]}  finite {finite}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-tokens", type=int, default=None,
                        help="forced target tokens (1..20; default: 20 on a GPU, 10 on CPU)")
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", choices=["value_zeroing", "reagent"], default=None)
    args = parser.parse_args(argv)
    model, tok = load()
    model = model.to(args.device)
    n = args.target_tokens or (20 if args.device != "cpu" else 10)
    batch = prefix(fnattr.prepare(model, tok, PROMPT, TARGET), n - 1)
    print(f"SmolLM2-135M on {args.device} ({torch.get_num_threads()} threads): prompt "
          f"{batch.source_ids.shape[1]} tokens, target {batch.target_ids.shape[1]} tokens, "
          f"{len(layer_stacks(model)['decoder'])} layers, attention {model.config._attn_implementation}")
    if args.skip != "value_zeroing":
        bench_value_zeroing(model, batch)
    if args.skip != "reagent":
        print(f"reagent: max_probe_steps {args.probe_steps}, num_probes {args.num_probes}")
        bench_reagent(model, batch, args.probe_steps, args.num_probes)


if __name__ == "__main__":
    main()

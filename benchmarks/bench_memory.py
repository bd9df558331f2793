"""Peak memory of a gradient method against prompt length, with and without `checkpointed`.

Run: python -m benchmarks.bench_memory [--lengths 256,512,1024,2048] [--layers 4]. A Llama built
from a config of realistic width (hidden 2048, MLP 5632, 32 heads, 4 key/value heads, as
TinyLlama-1.1B, with fewer layers so that it runs on a CPU in minutes), float32, random
weights; saliency of 1 forced target token after a prompt of each length. Each point runs in
its own process, so its peak resident memory (VmHWM) is its own; the table prints the peak
above the loaded model. Activation memory grows with the number of layers: with all 22 of
TinyLlama, the plain run's activation term would be about 22/layers times larger, and the
checkpointed run's about the same as here.
"""

import argparse
import json
import sys
import time

import torch

from benchmarks._common import in_subprocess, peak_rss_mb, reset_peak_rss


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def point(length: int, layers: int, checkpoint: bool) -> dict:
    """One measurement, in this process: saliency of one target token after `length` tokens."""
    from fnattr.batch import Batch
    from fnattr.hooks import checkpointed
    from fnattr.methods import saliency

    model = build(layers)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 32000, (1, length), generator=g)
    tgt = torch.randint(3, 32000, (1, 1), generator=g)
    yes = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    batch = Batch(source_ids=src, source_mask=yes(src), source_special=~yes(src), target_ids=tgt,
                  target_mask=yes(tgt), target_special=~yes(tgt), source_tokens=(("t",) * length,),
                  target_tokens=(("t",),), sources=("x",), targets=("y",), is_encoder_decoder=False,
                  pad_id=0)
    loaded = peak_rss_mb()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if checkpoint:
        with checkpointed(model):
            out = saliency(model, batch)
    else:
        out = saliency(model, batch)
    return {"length": length, "checkpoint": checkpoint, "loaded_mb": loaded,
            "peak_mb": peak_rss_mb(), "wall": time.perf_counter() - t0,
            "cpu": time.process_time() - c0, "sum": float(out.source.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # "length,0|1": one run
    args = parser.parse_args()
    if args.point:
        length, ckpt = args.point.split(",")
        print(json.dumps(point(int(length), args.layers, ckpt == "1")))
        return
    print(f"Llama, hidden 2048, MLP 5632, 32 heads (4 kv), {args.layers} layers, float32, CPU, "
          f"saliency of 1 target token; peak RSS above the loaded model, each point in its own process")
    for length in map(int, args.lengths.split(",")):
        rows = [in_subprocess("benchmarks.bench_memory", "--layers", str(args.layers),
                              "--point", f"{length},{int(c)}") for c in (False, True)]
        plain, ckpt = (r["peak_mb"] - r["loaded_mb"] for r in rows)
        same = abs(rows[0]["sum"] - rows[1]["sum"]) <= 1e-5 * max(abs(rows[0]["sum"]), 1e-12)
        print(f"prompt {length:5d}  plain {plain:8.0f} MB  checkpointed {ckpt:8.0f} MB  "
              f"ratio {plain / max(ckpt, 1):4.2f}x  cpu {rows[0]['cpu']:6.1f}s vs {rows[1]['cpu']:6.1f}s  "
              f"same scores: {same}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

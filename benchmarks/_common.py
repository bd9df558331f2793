"""Shared set-up for the benchmarks: SmolLM2, fixed prompts, timing and peak-memory helpers."""

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fnattr

from benchmarks._prompts import PROMPT, PROMPTS, TARGET  # noqa: F401  (re-exported)


def load():
    model, tok = fnattr.load_model()
    return model, tok


def n_tokens(tok, text: str, special: bool) -> int:
    return len(tok(text, add_special_tokens=special)["input_ids"])


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process (`time.process_time`) and `fn()`'s result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def best_time(fn: Callable[[], object], repeat: int = 2) -> float:
    """Best wall time of `repeat` runs (the machine is shared: the minimum is the least noisy)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux). ru_maxrss cannot be used: a child inherits its
    parent's peak across fork and exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Peak resident memory since start or the last `reset_peak_rss`, in MB (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_subprocess(module: str, *args: str) -> dict:
    """Run `python -m module args` and parse the JSON it prints last (fresh peak RSS)."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def smollm2_shaped(dtype, device: str = "cuda"):
    """A randomly initialised Llama of SmolLM2-135M's shape (no weights to load)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def random_batch(model, n, src=20, tgt=20):
    """`n` rows of random token ids, `src` + `tgt` long, as a prepared batch."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(10, 49000, (n, src + tgt), generator=g)
    true = torch.ones(n, src, dtype=torch.bool)
    return fnattr.Batch(
        source_ids=ids[:, :src], source_mask=true, source_special=torch.zeros_like(true),
        target_ids=ids[:, src:], target_mask=torch.ones(n, tgt, dtype=torch.bool),
        target_special=torch.zeros(n, tgt, dtype=torch.bool),
        source_tokens=(("x",) * src,) * n, target_tokens=(("y",) * tgt,) * n,
        sources=("x",) * n, targets=("y",) * n, is_encoder_decoder=False, pad_id=2, unk_id=0)

"""GPU check (run on a CUDA machine): the CPU test properties hold on CUDA, and GPU timings.

Uses the tiny test models (float64: CUDA vs CPU equality) and a randomly initialised Llama with
SmolLM2-135M's shape (timings do not depend on the weights' values). Prints ratios measured in
this one run: one-pass vs per-step loop, batch of 8 vs 8 single calls, IG peak memory vs n_steps,
and compiled saliency and IG against eager (`bench_compile`).
"""

import sys
import time

import torch

import fnattr
from fnattr.methods import integrated_gradients, saliency
from benchmarks._common import random_batch, smollm2_shaped
from tests.conftest import _build, _tokenizer

DEVICE = "cuda"


def sync_time(fn, repeat=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def check_equal_to_cpu():
    for name in ("gpt2", "llama", "bart", "t5"):
        tok = _tokenizer("$A </s>" if name in ("bart", "t5") else "<s> $A")
        cpu = _build(name, len(tok))
        gpu = _build(name, len(tok)).to(DEVICE)
        sources, targets = ["The capital of France is", "A dog"], [" Paris is a city", " ran"]
        for method, kw in ((saliency, {}), (integrated_gradients, {"n_steps": 8})):
            a = method(cpu, fnattr.prepare(cpu, tok, sources, targets), attribute_target=True, **kw)
            b = method(gpu, fnattr.prepare(gpu, tok, sources, targets), attribute_target=True, **kw)
            err = float((a.source - b.source).abs().max() / a.source.abs().max())
            print(f"{name:6s} {method.__name__:22s} CUDA vs CPU (float64) max rel diff {err:.1e}")
            assert err < 1e-6, err  # Llama computes rotary cos/sin in float32 on each device
            assert b.source.device.type == "cpu"  # results come back on the CPU


def check_every_method_on_cuda():
    """Every method in METHODS gives on CUDA what it gives on CPU (float64, seeded methods too)."""
    for name in ("llama", "bart"):
        tok = _tokenizer("$A </s>" if name == "bart" else "<s> $A")
        cpu, gpu = _build(name, len(tok)), _build(name, len(tok)).to(DEVICE)
        for method_name, method in fnattr.methods.METHODS.items():
            kw = {"n_steps": 4} if "integrated" in method_name else {}
            kw |= {"seed": 0} if method_name == "lime" else {}  # lime draws a fresh seed by default
            a = method(cpu, fnattr.prepare(cpu, tok, ["The capital of France is"], [" Paris is"]), **kw)
            try:
                b = method(gpu, fnattr.prepare(gpu, tok, ["The capital of France is"], [" Paris is"]), **kw)
            except Exception as err:  # report and go on to the timings
                print(f"{name:6s} {method_name:34s} FAILED on CUDA: {type(err).__name__}: {err}")
                continue
            err = float((a.source - b.source).abs().max() / a.source.abs().max().clamp(min=1e-30))
            verdict = "ok" if err < 1e-5 else "MISMATCH"
            print(f"{name:6s} {method_name:34s} CUDA vs CPU (float64) max rel diff {err:.1e} {verdict}")


def per_step(method, model, batch, **kw):
    for t in range(batch.target_ids.shape[1]):
        sub = fnattr.Batch(**{**batch.__dict__, "target_ids": batch.target_ids[:, : t + 1],
                              "target_mask": batch.target_mask[:, : t + 1],
                              "target_special": batch.target_special[:, : t + 1],
                              "target_tokens": tuple(r[: t + 1] for r in batch.target_tokens)})
        method(model, sub, attr_pos_start=t, attr_pos_end=t + 1, **kw)


def timings(dtype):
    model = smollm2_shaped(dtype)
    one = random_batch(model, 1)
    eight = random_batch(model, 8)
    singles = [random_batch(model, 1) for _ in range(8)]
    ig = {"n_steps": 16, "internal_batch_size": 64}
    for method, kw in ((saliency, {}), (integrated_gradients, ig)):
        t1 = sync_time(lambda: method(model, one, **kw))
        tl = sync_time(lambda: per_step(method, model, one, **kw), repeat=1)
        tb = sync_time(lambda: method(model, eight, **kw))
        ts = sync_time(lambda: [method(model, b, **kw) for b in singles], repeat=1)
        print(f"{str(dtype):15s} {method.__name__:22s} one-pass {t1 * 1e3:7.1f} ms, per-step loop "
              f"{tl * 1e3:7.1f} ms ({tl / t1:4.1f}x); batch of 8 {tb * 1e3:7.1f} ms vs 8 singles "
              f"{ts * 1e3:7.1f} ms ({ts / tb:4.1f}x)")
    for n_steps in (16, 64):
        torch.cuda.reset_peak_memory_stats()
        integrated_gradients(model, eight, n_steps=n_steps, internal_batch_size=32)
        print(f"{str(dtype):15s} IG batch of 8, n_steps={n_steps}, internal_batch_size=32: peak "
              f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), file=sys.stderr)
    check_equal_to_cpu()
    check_every_method_on_cuda()
    for dtype in (torch.float32, torch.bfloat16):
        timings(dtype)
    from benchmarks import bench_compile  # compiled saliency and IG against eager, on CUDA

    bench_compile.main(["--device", "cuda", "--n-steps", "16", "--rounds", "3"])

"""torch.compile against eager, and the compiled model's two backward paths.

Run: python -m benchmarks.bench_compile [--device cpu|cuda] [--n-steps 4] [--backend inductor]
SmolLM2-135M on CPU (its weights), a randomly initialised Llama of the same shape on CUDA; one
prompt of 20 + 20 tokens. vmap cannot run a compiled graph's backward, so a compiled model takes
its per-step gradients either from replicated rows (m copies of each row for m steps, one plain
backward: `fnattr.methods._triangular._replicated`, the default off the CPU) or from one backward
per step (the engine's fallback, the default on a CPU, where this benchmark found it cheaper). Prints the first compiled call (the compile), then the best of
`--rounds` interleaved rounds of eager, compiled-replicated and compiled-per-step, by CPU
seconds (`time.process_time`) on a CPU and by synchronised wall seconds on CUDA, their ratios,
and the largest relative difference from eager.
"""

import argparse
import time
import warnings
from unittest import mock

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, load, random_batch, smollm2_shaped
from fnattr.compiled import compile as compile_for_attribution
from fnattr.methods import _triangular, integrated_gradients, saliency


def backward_path(kind: str):
    """The compiled model's per-step gradients from replicated rows (on a CPU too), or one
    backward per step (on an accelerator too)."""
    if kind == "per step":
        return mock.patch.object(_triangular, "_replicated", lambda *a, **k: None)
    return mock.patch.object(_triangular, "REPLICATE_ON_CPU", kind == "replicated")


def seconds(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def model_and_batch(device: str):
    if device == "cpu":
        model, tok = load()
        return model, fnattr.prepare(model, tok, PROMPT, TARGET)
    model = smollm2_shaped(torch.float32)
    return model, random_batch(model, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n-steps", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    model, batch = model_and_batch(args.device)
    compiled = compile_for_attribution(model, backend=args.backend)
    methods = {"saliency": (saliency, {}),
               f"IG({args.n_steps})": (integrated_gradients, {"n_steps": args.n_steps})}
    print(f"torch {torch.__version__}, {args.device}, backend {args.backend}, "
          f"{batch.source_ids.shape[1]} + {batch.target_ids.shape[1]} tokens", flush=True)
    warnings.simplefilter("ignore")  # the per-step fallback's warning, on purpose here
    for name, (fn, kw) in methods.items():
        first = seconds(lambda: fn(compiled, batch, **kw), args.device)
        times = {"eager": [], "replicated": [], "per step": []}
        outs = {}
        for _ in range(args.rounds):
            for kind in times:
                m = model if kind == "eager" else compiled
                with backward_path(kind):
                    times[kind].append(seconds(lambda: outs.__setitem__(kind, fn(m, batch, **kw)),
                                               args.device))
        best = {k: min(v) for k, v in times.items()}
        ref = outs["eager"].source
        diff = max(float((o.source - ref).abs().max() / ref.abs().max()) for o in outs.values())
        print(f"{name:9s} first compiled call {first:6.1f}s | eager {best['eager']:6.2f}s  "
              f"compiled, replicated {best['replicated']:6.2f}s ({best['eager'] / best['replicated']:4.2f}x "
              f"eager)  compiled, per step {best['per step']:6.2f}s ({best['eager'] / best['per step']:4.2f}x "
              f"eager)  replicated vs per step {best['per step'] / best['replicated']:4.2f}x  "
              f"max rel diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

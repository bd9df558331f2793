"""The peer, inseq 0.7.1, on the same model and inputs as bench_core. Runs in its own venv:
`.peer/bin/python benchmarks/peer_inseq.py MODEL_DIR` (MODEL_DIR: fnattr's safetensors cache of
SmolLM2). Prints one JSON line of timings. Uses inseq's public API only.
"""

import json
import sys
import time

import inseq
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, ".")
from benchmarks._prompts import PROMPT, PROMPTS, TARGET  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(path: str, n_steps: int) -> None:
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    res = {}
    for method, kwargs in (("saliency", {}), ("integrated_gradients", {"n_steps": n_steps})):
        model = inseq.load_model(hf, method, tokenizer=tok)
        run = lambda: model.attribute(PROMPT, PROMPT + TARGET, show_progress=False, **kwargs)  # noqa: E731
        run()  # warm-up
        res[f"{method}_single"] = timed(run)
        texts = [p + TARGET for p in PROMPTS]
        res[f"{method}_batch8"] = timed(lambda: model.attribute(
            PROMPTS, texts, show_progress=False, batch_size=8, **kwargs))
        res[f"{method}_8_singles"] = timed(lambda: [model.attribute(
            p, t, show_progress=False, **kwargs) for p, t in zip(PROMPTS, texts)])
    print(json.dumps(res))


def occlusion(path: str) -> None:
    """The peer's occlusion of 9 generated tokens (greedy) after PROMPT."""
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    model = inseq.load_model(hf, "occlusion", tokenizer=tok)
    seconds = timed(lambda: model.attribute(PROMPT, generation_args={"max_new_tokens": 9,
                                                                     "do_sample": False},
                                            show_progress=False))
    print(json.dumps({"occlusion_9_generated": seconds}))


def convergence(path: str, n_steps: int) -> None:
    """The peer's IG with `n_steps` points (its default: 50) on PROMPT + TARGET: CPU seconds of
    this process, and each step's completeness error |delta| / |f(x) - f(baseline)|, from
    captum's convergence delta (delta = sum of the scores - (f(x) - f(baseline)))."""
    import torch

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    model = inseq.load_model(hf, "integrated_gradients", tokenizer=tok)
    model.attribute("Hi", "Hi there", n_steps=2, show_progress=False)  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    out = model.attribute(PROMPT, PROMPT + TARGET, n_steps=n_steps, return_convergence_delta=True,
                          show_progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    seq = out.sequence_attributions[0]
    delta = seq.step_scores["deltas"].double()
    total = sum(torch.nansum(t.double(), dim=(0, 2)) for t in (seq.source_attributions,
                                                              seq.target_attributions) if t is not None)
    rel = (delta.abs() / (total - delta).abs()).tolist()
    print(json.dumps({"cpu": cpu, "wall": wall, "relative_error": rel, "unk": tok.unk_token}))


if __name__ == "__main__":
    if sys.argv[2:3] == ["occlusion"]:
        occlusion(sys.argv[1])
    elif sys.argv[2:3] == ["convergence"]:
        convergence(sys.argv[1], int(sys.argv[3]))
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)

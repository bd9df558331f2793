"""Models spread over devices (`load_model(device_map=...)`, accelerate): every method gives the
scores of the model on one device. On CPU, layers offloaded to disk; on a GPU, layers split
between the GPU and the CPU."""

import pytest
import torch

from fnattr import prepare, targets
from fnattr.loading import load_model
from fnattr.methods import attention, integrated_gradients, occlusion, saliency
from tests.conftest import _build

pytest.importorskip("accelerate", reason="device maps need accelerate (the gguf extra)")

METHODS = [(saliency, {}), (integrated_gradients, {"n_steps": 8}), (occlusion, {}), (attention, {})]
TEXTS = ["The capital of France is", "The cat"]


def _maps(arch: str, far: str) -> dict[str, str]:
    """A device map with the first layer and the final norm on `far`, the rest on the CPU."""
    if arch == "gpt2":
        return {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                "transformer.h.0": far, "transformer.h.1": "cpu", "transformer.ln_f": far,
                "lm_head": "cpu"}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": far,
            "model.layers.1": "cpu", "model.norm": far, "lm_head": "cpu"}


@pytest.fixture(params=["gpt2", "llama"])
def folder(request, tmp_path_factory, decoder_tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    _build(request.param, len(decoder_tokenizer)).save_pretrained(path)
    decoder_tokenizer.save_pretrained(path)
    return request.param, path


def _compare(reference, tokenizer, placed, placed_tokenizer, tol=0.0):
    a = prepare(reference, tokenizer, TEXTS, max_new_tokens=3)
    b = prepare(placed, placed_tokenizer, TEXTS, max_new_tokens=3)
    assert torch.equal(a.target_ids, b.target_ids.to(a.target_ids.device))
    for method, options in METHODS:
        want = method(reference, a, targets.probability, **options)
        got = method(placed, b, targets.probability, **options)
        torch.testing.assert_close(got.source.cpu(), want.source.cpu(), rtol=tol, atol=tol)
        if want.target is not None:
            torch.testing.assert_close(got.target.cpu(), want.target.cpu(), rtol=tol, atol=tol)


def test_layers_offloaded_to_disk_give_the_same_scores(folder, tmp_path):
    arch, path = folder
    reference, tokenizer = load_model(str(path), dtype="float64")
    placed, placed_tokenizer = load_model(str(path), dtype="float64", device_map=_maps(arch, "disk"),
                                          offload_folder=tmp_path / "offload")
    assert "disk" in placed.hf_device_map.values()
    _compare(reference, tokenizer, placed, placed_tokenizer)
    auto, _ = load_model(str(path), dtype="float64", device_map="auto")  # no GPU: all on the CPU
    assert {p.device.type for p in auto.parameters()} == {"cpu"} and not auto.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_layers_split_between_gpu_and_cpu_give_the_scores_of_one_gpu(folder):
    arch, path = folder
    reference, tokenizer = load_model(str(path), dtype="float64", device="cuda")
    mixed = {k: (0 if v == "cpu" else "cpu") for k, v in _maps(arch, "far").items()}
    placed, placed_tokenizer = load_model(str(path), dtype="float64", device_map=mixed)
    _compare(reference, tokenizer, placed, placed_tokenizer, tol=1e-10)  # CPU and GPU kernels differ

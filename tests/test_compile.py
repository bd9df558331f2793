"""Methods on a `torch.compile`d model.

vmap cannot run a compiled graph's backward, so the engine falls back to one backward per step
(with a warning); the hooked output-layer input is not in a compiled graph either."""

import pytest
import torch

from fnattr import prepare
from fnattr.methods import integrated_gradients, saliency
from tests.state import assert_unchanged, snapshot


def _compare(model, tok, sources, targets):
    batch = prepare(model, tok, sources, targets)
    eager = [saliency(model, batch), integrated_gradients(model, batch, n_steps=3)]
    before = snapshot(model)
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match="one backward per step"):
        got = [saliency(compiled, batch), integrated_gradients(compiled, batch, n_steps=3)]
    assert_unchanged(model, before)
    return eager, got


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_model_gives_the_eager_scores(gpt2):
    model, tok = gpt2
    eager, got = _compare(model, tok, ["The capital of France is"], [" Paris is a city"])
    for a, b in zip(eager, got):
        torch.testing.assert_close(b.source, a.source, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(b.target, a.target, rtol=1e-9, atol=1e-15)


@pytest.mark.xfail(strict=True, reason="open: with a left-padded row, the compiled GPT2 forward "
                   "through embedding_hooks gives step scores ~5e-4 off eager; unpadded rows match")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_model_with_left_padding(gpt2):
    model, tok = gpt2
    eager, got = _compare(model, tok, ["The capital of France is", "A dog"], [" Paris is", " ran in"])
    torch.testing.assert_close(got[0].step_scores["probability"], eager[0].step_scores["probability"],
                               rtol=1e-9, atol=1e-12)

import pytest
import torch

from fnattr.hooks.layer import layer_hooks, resolve_layers
from tests.state import assert_unchanged, snapshot

IDS = torch.tensor([[5, 6, 7, 8]])


def _hidden(model, name):
    """Output of `name` by a plain hook (independent of layer_hooks)."""
    seen = []
    module = model.get_submodule(name)
    h = module.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
    finally:
        h.remove()
    return seen[0], logits


def test_records_and_replaces_tensor_and_tuple_outputs(gpt2):
    model, _ = gpt2
    for name in ("transformer.h.0", "transformer.h.0.attn"):  # Tensor output, tuple output
        want, logits = _hidden(model, name)
        with layer_hooks(model, name) as h, torch.no_grad():
            got_logits = model(input_ids=IDS).logits
            (got,) = h.take()
            assert h.take() == []
            h.replace(lambda a: a * 0)
            zeroed = model(input_ids=IDS).logits
            h.check_used()
            assert torch.all(h.take()[0] == 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
        assert not torch.allclose(zeroed, logits)
        # replacing by the recorded tensor reproduces the forward exactly
        with layer_hooks(model, name) as h, torch.no_grad():
            h.replace(want.clone())
            torch.testing.assert_close(model(input_ids=IDS).logits, logits, rtol=0, atol=0)


def test_removed_after_exception_and_model_unchanged(gpt2):
    model, _ = gpt2
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with layer_hooks(model, ["transformer.h.0", "transformer.h.1"]):
            raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_wrong_shape_and_unused_replacement_raise(gpt2):
    model, _ = gpt2
    before = snapshot(model)
    with layer_hooks(model, "transformer.h.1") as h, torch.no_grad():
        h.replace(torch.zeros(1, 2, 3))
        with pytest.raises(ValueError, match="replacement"):
            model(input_ids=IDS)
        h.replace(torch.zeros(1, 2, 3))
        with pytest.raises(RuntimeError, match="not used"):
            h.check_used()
    assert_unchanged(model, before)


def test_resolve_layers_errors_and_dedup(gpt2, seq2seq_model):
    model, _ = gpt2
    with pytest.raises(ValueError, match="transformer.h.9"):
        resolve_layers(model, "transformer.h.9")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layers(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no module"):
        resolve_layers(model, [])
    block = model.get_submodule("transformer.h.0")
    assert resolve_layers(model, ["transformer.h.0", block]) == [block]
    other, _ = seq2seq_model
    enc, dec = other.get_encoder().embed_tokens, other.get_decoder().embed_tokens
    with layer_hooks(other, [enc, dec]) as h, torch.no_grad():
        other(input_ids=IDS, decoder_input_ids=IDS[:, :2])
        calls = h.take()
    assert [c.shape[1] for c in calls] == [4, 2]  # encoder call first, then decoder

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fnattr.hooks import value_zeroing
from fnattr.hooks.value_zeroing import capture_layers, layer_stacks, resolve_heads
from tests.conftest import _build
from tests.state import assert_unchanged, snapshot

NAMES = ("gpt2", "llama", "bart", "t5")
IDS = torch.tensor([[5, 17, 33, 40, 9, 12]])
DEC = torch.tensor([[2, 7, 8, 9]])


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name, impl):
        if (name, impl) not in cache:
            model = _build(name, 400)
            model.set_attn_implementation(impl)
            cache[name, impl] = model
        return cache[name, impl]
    return get


def _inputs(model):
    if model.config.is_encoder_decoder:
        return {"input_ids": IDS, "decoder_input_ids": DEC}
    return {"input_ids": IDS}


def _logits(model):
    with torch.no_grad():
        return model(**_inputs(model), use_cache=False).logits


def _value_modules(model, name, layer, kind):
    """Test-only table: the module whose output holds the values (the hook itself has none)."""
    stack = layer_stacks(model)["encoder" if kind == "encoder" else "decoder"][layer]
    if name == "gpt2":
        return stack.attn.c_attn, 2
    if name == "llama":
        return stack.self_attn.v_proj, None
    if name == "bart":
        return (stack.encoder_attn if kind == "cross" else stack.self_attn).v_proj, None
    return (stack.layer[1].EncDecAttention if kind == "cross" else stack.layer[0].SelfAttention).v, None


def _manual(model, name, layer, kind, token, head, n_heads):
    """Logits with the value of `token` (one head or all) zeroed by a hook on the value projection."""
    module, third = _value_modules(model, name, layer, kind)

    def hook(m, args, out):
        out = out.clone()
        width = out.shape[-1] // (3 if third is not None else 1)
        lo = width * (third or 0)
        if head is not None:
            d = width // n_heads
            lo, width = lo + head * d, d
        out[:, token, lo:lo + width] = 0
        return out
    handle = module.register_forward_hook(hook)
    try:
        return _logits(model)
    finally:
        handle.remove()


def _kinds(model):
    return ("decoder", "encoder", "cross") if model.config.is_encoder_decoder else ("decoder",)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_equals_zeroing_the_value_projection(built, name, impl):
    model = built(name, impl)
    clean = _logits(model)
    for kind in _kinds(model):
        seq = DEC.shape[1] if kind == "decoder" and model.config.is_encoder_decoder else IDS.shape[1]
        for head in (None, 1):
            with value_zeroing(model, [1], None if head is None else [head], attention=kind) as vz:
                torch.testing.assert_close(_logits(model), clean, rtol=0, atol=0)  # nothing zeroed yet
                tokens = torch.zeros(1, seq, dtype=torch.bool)
                tokens[0, 2] = True
                vz.zero(tokens)
                got = _logits(model)
            n_heads = model.config.num_key_value_heads if name == "llama" else 4
            want = _manual(model, name, 1, kind, 2, head, n_heads)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            assert not torch.allclose(got, clean, rtol=0, atol=1e-12), (kind, head)
            assert vz.calls[1] == 1
            if kind == "decoder":  # causal: positions before the zeroed token are untouched
                assert torch.equal(got[:, :2], clean[:, :2])


def test_only_chosen_layers_and_rows(built):
    model = built("llama", "sdpa")
    ids = IDS.expand(3, -1)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    tokens = torch.zeros(3, IDS.shape[1], dtype=torch.bool)
    tokens[1, 0] = tokens[2, 3] = True
    with value_zeroing(model, layers=0) as vz, torch.no_grad():
        vz.zero(tokens)
        got = model(input_ids=ids).logits
    assert torch.equal(got[0], clean[0])  # row 0 zeroes nothing
    assert not torch.allclose(got[1], clean[1]) and torch.equal(got[2, :3], clean[2, :3])
    assert dict(vz.calls) == {0: 1}


def test_restored_after_exception_and_nesting(built):
    model = built("gpt2", "eager")
    before = snapshot(model)
    clean = _logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with value_zeroing(model, [0]) as vz:
            with value_zeroing(model, [1]):
                vz.zero(torch.ones(1, IDS.shape[1], dtype=torch.bool))
                raise RuntimeError("boom")
    assert "get_interface" not in ALL_ATTENTION_FUNCTIONS.__dict__
    assert_unchanged(model, before)
    assert torch.equal(_logits(model), clean)
    with pytest.raises(ValueError, match="value heads"):  # error raised inside the forward
        with value_zeroing(model, [0], heads=[7]) as vz:
            vz.zero(torch.ones(1, IDS.shape[1], dtype=torch.bool))
            _logits(model)
    assert "get_interface" not in ALL_ATTENTION_FUNCTIONS.__dict__
    assert_unchanged(model, before)


def test_validation(built):
    model = built("gpt2", "sdpa")
    with pytest.raises(ValueError, match="layers"):
        with value_zeroing(model, [2]):
            pass
    with pytest.raises(ValueError, match="encoder-decoder"):
        with value_zeroing(model, attention="cross"):
            pass
    with pytest.raises((ValueError, TypeError), match="attention"):  # TypeError under jaxtyping
        with value_zeroing(model, attention="self"):
            pass
    assert resolve_heads({1: 2}, 3) == {0: (), 1: (2,), 2: ()}
    assert resolve_heads(range(2), 2) == {0: (0, 1), 1: (0, 1)}
    assert resolve_heads(None, 1) == {0: None}
    with pytest.raises(ValueError, match="heads"):
        resolve_heads([-1], 2)


def test_capture_layers(built):
    model = built("t5", "sdpa")
    layers = layer_stacks(model)["decoder"]
    count = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]  # noqa: E731
    model(**_inputs(model), output_hidden_states=True)  # transformers adds its own hooks once
    before = count()
    with capture_layers(layers) as calls:
        out = model(**_inputs(model), output_hidden_states=True)
    assert sorted(calls) == [0, 1]
    torch.testing.assert_close(calls[0].output, out.decoder_hidden_states[1])
    assert count() == before

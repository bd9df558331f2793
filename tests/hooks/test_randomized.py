import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fnattr.hooks.randomized import layer_stack, normal_like, plan, randomized
from tests.state import assert_unchanged, snapshot

IDS = torch.tensor([[5, 6, 7, 8]])
STACKS = {
    "gpt2": ("transformer.h.1", "transformer.h.0"),
    "llama": ("model.layers.1", "model.layers.0"),
    "bart": ("model.decoder.layers.1", "model.decoder.layers.0",
             "model.encoder.layers.1", "model.encoder.layers.0"),
    "t5": ("decoder.block.1", "decoder.block.0", "encoder.block.1", "encoder.block.0"),
}


def _bits(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as raw bytes: equal means bit-identical (NaN, -0.0 included)."""
    return {k: v.detach().cpu().contiguous().view(torch.uint8).clone()
            for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bit_identical(model, bits) -> None:
    now = _bits(model)
    assert now.keys() == bits.keys()
    for k in bits:
        assert torch.equal(now[k], bits[k]), k


def _logits(model):
    kwargs = {"decoder_input_ids": IDS[:, :2]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _rng_states():
    """numpy's and torch's global generators. Python's `random` is checked in a fresh interpreter
    (test_python_random_unchanged): beartype, which the test session wraps around every fnattr
    function, draws from it (`random.getrandbits`) to sample the items of container arguments."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return np.random.get_state(), torch.get_rng_state(), cuda


def _assert_rng(states) -> None:
    now = _rng_states()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(now[0], states[0], strict=True))
    assert torch.equal(now[1], states[1])
    assert len(now[2]) == len(states[2]) and all(map(torch.equal, now[2], states[2]))


_FRESH = """
import random, numpy as np, torch
from transformers import GPT2Config, GPT2LMHeadModel
from fnattr.hooks.randomized import layer_stack, randomized
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                   bos_token_id=1, eos_token_id=2))
random.seed(5); np.random.seed(5); torch.manual_seed(5)
states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
with randomized(model, list(layer_stack(model)) + ["lm_head"], tied="untie"):
    pass
assert random.getstate() == states[0], "random"
assert np.array_equal(np.random.get_state()[1], states[1]), "numpy"
assert torch.equal(torch.get_rng_state(), states[2]), "torch"
print("ok")
"""


def test_python_random_unchanged_in_a_fresh_interpreter():
    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", _FRESH], cwd=root, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_layer_stack_is_top_first_decoder_before_encoder(any_model):
    model, _ = any_model
    names = layer_stack(model)
    assert names == STACKS[{"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama",
                            "BartForConditionalGeneration": "bart",
                            "T5ForConditionalGeneration": "t5"}[type(model).__name__]]
    # an independent notion of "block": the classes transformers will not split across devices
    assert all(type(model.get_submodule(n)).__name__ in model._no_split_modules for n in names)


def test_randomizes_only_the_layers_and_restores_bit_exactly(any_model):
    model, _ = any_model
    before, bits, logits = snapshot(model), _bits(model), _logits(model)
    top = layer_stack(model)[0]
    inside = {f"{top}.{n}" for n, _ in model.get_submodule(top).named_parameters()}
    states = _rng_states()
    with randomized(model, top, seed=3) as names:
        assert set(names) == inside
        for name, p in model.named_parameters():
            old = before["params"][name]
            if name in inside and old.std(correction=0) > 0:
                assert not torch.equal(p, old), name  # redrawn
            elif name in inside:  # constant tensors (LayerNorm gains at init) keep their value
                assert torch.equal(p, old), name
            else:
                assert torch.equal(p, old), name  # untouched
            assert (p.shape, p.dtype, p.device, p.requires_grad) == (
                old.shape, old.dtype, old.device, before["requires_grad"][name])
        assert not torch.allclose(_logits(model), logits)
    _assert_rng(states)
    _assert_bit_identical(model, bits)
    assert_unchanged(model, before)
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_restored_after_exception_and_keyboard_interrupt(any_model, error):
    model, _ = any_model
    before, bits = snapshot(model), _bits(model)
    name = next(n for n, p in model.named_parameters() if n.startswith(layer_stack(model)[0] + ".")
                and p.std() > 0)
    with pytest.raises(error), randomized(model, list(layer_stack(model))):
        assert not torch.equal(model.get_parameter(name), before["params"][name])
        raise error("boom")
    _assert_bit_identical(model, bits)
    assert_unchanged(model, before)


def test_seeded_without_the_global_rng(gpt2):
    model, _ = gpt2
    states = _rng_states()

    def draw(seed, layers, global_seed):
        torch.manual_seed(global_seed)
        with randomized(model, layers, seed=seed):
            return model.transformer.h[1].mlp.c_fc.weight.clone()

    try:
        a = draw(0, "transformer.h.1", 1)
        assert torch.equal(a, draw(0, "transformer.h.1", 2))  # the global seed plays no part
        assert not torch.equal(a, draw(1, "transformer.h.1", 1))  # `seed` does
        # a layer's values do not depend on the layers randomised with it (cascading stages)
        assert torch.equal(a, draw(0, ["transformer.h.1", "transformer.h.0"], 1))
    finally:
        torch.set_rng_state(states[1])
    with randomized(model, "transformer.h.1"):
        pass
    _assert_rng(states)


def test_normal_like_keeps_shape_dtype_and_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.3 + 0.5
    new = normal_like(w, torch.Generator().manual_seed(1))
    assert new.shape == w.shape and new.dtype == torch.float64
    torch.testing.assert_close(new.std(), w.std(), rtol=0.05, atol=0)
    torch.testing.assert_close(new.mean(), w.mean(), rtol=0, atol=0.02)
    assert torch.equal(normal_like(torch.ones(5), g), torch.ones(5))  # constant stays constant
    assert normal_like(w.half(), g).dtype == torch.float32  # cast back by `randomized`


def test_tied_weights(gpt2):
    model, _ = gpt2
    wte, head = model.transformer.wte, model.lm_head
    assert head.weight is wte.weight
    before, bits = snapshot(model), _bits(model)
    with pytest.raises(ValueError, match=r"`layers`.*'transformer.wte.weight'.*lm_head.weight.*tied"):
        with randomized(model, "transformer.wte"):
            pytest.fail("entered")
    _assert_bit_identical(model, bits)
    original = wte.weight.detach().clone()
    with randomized(model, "transformer.wte", tied="untie") as names:
        assert names == ("transformer.wte.weight",)
        assert head.weight is not wte.weight
        assert torch.equal(head.weight, original) and not torch.equal(wte.weight, original)
        assert wte.weight.requires_grad == head.weight.requires_grad
    assert head.weight is wte.weight
    with randomized(model, "lm_head", tied="share") as names:
        assert names == ("lm_head.weight",)
        assert head.weight is wte.weight and not torch.equal(wte.weight, original)
    with randomized(model, ["lm_head", "transformer.wte"]):  # the whole tie inside: no error
        assert head.weight is wte.weight and not torch.equal(wte.weight, original)
    _assert_bit_identical(model, bits)
    assert_unchanged(model, before)


def test_tied_embeddings_of_seq2seq(seq2seq_model):
    model, _ = seq2seq_model
    shared = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is shared)
    bits = _bits(model)
    with pytest.raises(ValueError, match="tied"):
        plan(model, name)
    original = shared.weight.detach().clone()
    others = [m for m in (model.get_encoder().embed_tokens, model.get_decoder().embed_tokens,
                          model.lm_head) if m is not shared]
    assert others and all(m.weight is shared.weight for m in others)
    with randomized(model, name, tied="untie"):
        assert not torch.equal(shared.weight, original)
        assert all(m.weight is others[0].weight and torch.equal(m.weight, original) for m in others)
    assert all(m.weight is shared.weight for m in others)
    _assert_bit_identical(model, bits)


def test_bad_arguments_raise_before_touching_the_model(gpt2):
    model, _ = gpt2
    before, bits = snapshot(model), _bits(model)
    with pytest.raises(ValueError, match=r"`layers`.*'transformer.h.9'.*transformer.h.1"):
        with randomized(model, ["transformer.h.1", "transformer.h.9"]):
            pytest.fail("entered")
    with pytest.raises(ValueError, match="`layers`.*not a submodule"):
        with randomized(model, torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="`layers` names no module"):
        with randomized(model, []):
            pass
    with pytest.raises(TypeError, match="layers"), randomized(model, [1]):
        pass
    with pytest.raises((TypeError, ValueError), match="tied"):  # TypeError: the session's beartype
        with randomized(model, "transformer.h.1", tied="no"):
            pass
    with pytest.raises(ValueError, match="`init`"):
        with randomized(model, "transformer.h.1", init="xavier"):
            pass
    _assert_bit_identical(model, bits)
    assert_unchanged(model, before)


def test_custom_init_and_a_failing_one(gpt2):
    model, _ = gpt2
    bits = _bits(model)
    with randomized(model, "transformer.h.0", init=lambda t, g: torch.zeros_like(t)):
        assert all(torch.all(p == 0) for p in model.transformer.h[0].parameters())
    calls = []

    def bad(t, g):  # fails on its third parameter, after two were overwritten
        calls.append(1)
        return t[:1] if len(calls) == 3 else torch.full_like(t, 7.0)

    with pytest.raises(ValueError, match="`init` returned .* shape"):
        with randomized(model, "transformer.h.0", init=bad):
            pytest.fail("entered")
    assert len(calls) == 3
    _assert_bit_identical(model, bits)

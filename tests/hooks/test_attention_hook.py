import copy

import pytest
import torch

from fnattr.hooks.attention import _configs, attention_modules, capture_attention, eager_attention
from tests.state import assert_unchanged, snapshot


def _inputs(model):
    kw = {"input_ids": torch.tensor([[1, 5, 9, 30, 7]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.tensor([[2, 8, 9]])
    return kw


def _impls(model):
    return [c._attn_implementation for c in _configs(model)]


def test_captured_weights_equal_output_attentions_in_eager_mode(any_model):
    model, _ = any_model
    before, impls = snapshot(model), _impls(model)
    assert set(impls) == {"sdpa"}  # the default implementation, which returns no weights
    with capture_attention(model) as cap:
        model(**_inputs(model))
        assert set(_impls(model)) == {"eager"}
    ref = copy.deepcopy(model)  # output_attentions=True leaves transformers' hooks on a model
    ref.set_attn_implementation("eager")
    out = ref(**_inputs(model), output_attentions=True)
    if model.config.is_encoder_decoder:
        pairs = {"self": out.decoder_attentions, "cross": out.cross_attentions,
                 "encoder": out.encoder_attentions}
    else:
        pairs = {"self": out.attentions}
    for kind, want in pairs.items():
        assert len(cap.weights[kind]) == len(want) == 2
        for got, w in zip(cap.weights[kind], want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))
    assert_unchanged(model, before)
    assert _impls(model) == impls


def test_kinds_by_architecture(any_model):
    model, _ = any_model
    found = {k: len(v) for k, v in attention_modules(model).items()}
    want = {"self": 2, "cross": 2, "encoder": 2} if model.config.is_encoder_decoder else {
        "self": 2, "cross": 0, "encoder": 0}
    assert found == want


def test_restored_after_an_exception(any_model):
    model, _ = any_model
    before, impls = snapshot(model), _impls(model)
    with pytest.raises(KeyError, match="boom"):
        with capture_attention(model) as cap:
            model(**_inputs(model))
            assert cap.weights["self"]
            raise KeyError("boom")
    assert_unchanged(model, before)
    assert _impls(model) == impls


def test_eager_attention_restores_each_config_and_module_attribute(gpt2):
    model, _ = gpt2
    model.config._attn_implementation_internal = "sdpa"
    model.transformer._attn_implementation = "marker"  # a per-module copy (GPT2Model keeps one)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with eager_attention(model):
                assert model.config._attn_implementation == "eager"
                assert model.transformer._attn_implementation == "eager"
                raise RuntimeError("inside")
        assert model.config._attn_implementation == "sdpa"
        assert model.transformer._attn_implementation == "marker"
    finally:
        model.transformer._attn_implementation = "sdpa"


def test_sdpa_gives_no_weights_so_eager_is_needed(gpt2):
    """Without the switch the attention modules return None: the context manager is what works."""
    model, _ = gpt2
    mod, index = attention_modules(model)["self"][0]
    seen = []
    handle = mod.register_forward_hook(lambda m, a, out: seen.append(out[index]))
    try:
        model(**_inputs(model))
        with eager_attention(model):
            model(**_inputs(model))
    finally:
        handle.remove()
    assert seen[0] is None and isinstance(seen[1], torch.Tensor)


def test_bad_kind_is_rejected_before_touching_the_model(gpt2):
    model, _ = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError, match="kinds"):
        with capture_attention(model, ["decoder"]):
            pass
    assert_unchanged(model, before)

"""`lrp_rules`: this model only, forward values unchanged, batched backward (vmap) equal to
single backwards, refusals in one line, and the model bit-identical after the block, an error or a
KeyboardInterrupt."""

import copy
import warnings

import pytest
import torch

from fnattr import prepare
from fnattr.hooks import checkpointed, lrp_rules
from fnattr.methods import attnlrp
from tests.architectures import build
from tests.state import assert_unchanged, snapshot

_CACHE: dict = {}


@pytest.fixture(scope="module")
def llama(decoder_tokenizer):
    if "llama" not in _CACHE:
        _CACHE["llama"] = build("llama", len(decoder_tokenizer))
    return _CACHE["llama"]


def _state(model: torch.nn.Module) -> dict:
    """Everything `lrp_rules` could touch: parameters and buffers, every module's own attributes
    (hook dicts and their contents, any instance `forward`) and the config."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": {name: {k: (dict(v) if isinstance(v, dict) else v)
                           for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
                    for name, m in model.named_modules()},
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
    }


def _assert_same(model: torch.nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["modules"] == before["modules"]
    assert after["config"] == before["config"] and after["attn"] == before["attn"]


def _embeds(model):
    return model.get_input_embeddings()(torch.tensor([[5, 7, 9, 11, 13, 4]])).detach().requires_grad_()


def test_forward_values_unchanged_and_batched_backward_equals_single(llama):
    emb = _embeds(llama)
    plain = llama(inputs_embeds=emb).logits
    for rule in ("attnlrp", "cp_lrp"):
        with lrp_rules(llama, rule):
            logits = llama(inputs_embeds=emb).logits
            assert torch.equal(logits, plain)
            picked = logits[0, -1, [3, 4, 5]]
            batched = torch.autograd.grad(picked, emb, torch.eye(3, dtype=emb.dtype),
                                          is_grads_batched=True, retain_graph=True)[0]
            single = torch.stack([torch.autograd.grad(picked[i], emb, retain_graph=True)[0]
                                  for i in range(3)])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-15)
        (g_plain,) = torch.autograd.grad(plain[0, -1, 3], emb, retain_graph=True)
        assert not torch.allclose(batched[0], g_plain)  # the rules change the backward


@pytest.mark.parametrize("how", ["exit", "error", "interrupt"])
def test_model_bit_identical_after_exit_error_and_interrupt(llama, how):
    before = _state(llama)
    snap = snapshot(llama)
    raised = {"exit": None, "error": RuntimeError, "interrupt": KeyboardInterrupt}[how]
    try:
        with lrp_rules(llama, "attnlrp"):
            assert any(len(m._forward_hooks) or len(m._forward_pre_hooks) for m in llama.modules())
            llama(inputs_embeds=_embeds(llama))
            if raised is not None:
                raise raised("inside the block")
    except (RuntimeError, KeyboardInterrupt) as error:
        assert raised is not None and isinstance(error, raised)
    _assert_same(llama, before)
    assert_unchanged(llama, snap)


def test_a_second_model_is_untouched(llama):
    other = copy.deepcopy(llama)
    emb = _embeds(other)
    (want,) = torch.autograd.grad(other(inputs_embeds=emb).logits[0, -1, 3], emb)
    before = _state(other)
    with lrp_rules(llama, "attnlrp"):
        _assert_same(other, before)
        (got,) = torch.autograd.grad(other(inputs_embeds=emb).logits[0, -1, 3], emb)
    assert torch.equal(got, want)


def test_refusals_are_one_line_and_leave_the_model_alone(llama, decoder_tokenizer):
    for name, cls in (("bloom", "BloomForCausalLM"), ("gemma2", "softcapping")):
        model = build(name, len(decoder_tokenizer))
        before = _state(model)
        with pytest.raises(ValueError, match=cls) as info:
            with lrp_rules(model, "attnlrp"):
                pass
        assert "\n" not in str(info.value)
        _assert_same(model, before)
    odd = copy.deepcopy(llama)

    class Swish(torch.nn.Module):  # an activation the rules do not know
        def forward(self, x):
            return x * torch.sigmoid(x)

    odd.model.layers[1].mlp.act_fn = Swish()
    before = _state(odd)
    with pytest.raises(ValueError, match=r"has no rule for Swish \(module 'model.layers.1.mlp.act_fn'"):
        with lrp_rules(odd, "cp_lrp"):
            pass
    _assert_same(odd, before)
    with pytest.raises((ValueError, TypeError), match="lrp"):  # TypeError under the type checker
        with lrp_rules(llama, "lrp"):
            pass


def test_nested_is_refused_and_checkpointed_composes(llama, decoder_tokenizer):
    with lrp_rules(llama, "attnlrp"):
        with pytest.raises(RuntimeError, match="already on this model"):
            with lrp_rules(llama, "cp_lrp"):
                pass
    batch = prepare(llama, decoder_tokenizer, ["The capital of France is"], [" Paris"])
    plain = attnlrp(llama, batch)
    before = _state(llama)
    with checkpointed(llama), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to one backward per step
        again = attnlrp(llama, batch)
    _assert_same(llama, before)
    torch.testing.assert_close(again.source, plain.source, rtol=1e-12, atol=1e-15)

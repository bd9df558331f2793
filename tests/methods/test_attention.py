import copy

import pytest
import torch

from fnattr import prepare
from fnattr.hooks.attention import _configs
from fnattr.methods import METHODS, attention
from fnattr.targets import logprob, probability
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"
_EAGER: dict[int, torch.nn.Module] = {}


def _reference(model, src, tgt, start_id):
    """output_attentions=True of an eager copy of the model, one unpadded example, no fnattr."""
    if id(model) not in _EAGER:
        _EAGER[id(model)] = copy.deepcopy(model)
        _EAGER[id(model)].set_attn_implementation("eager")
    ref = _EAGER[id(model)]
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            dec = torch.cat([torch.tensor([start_id]), tgt[:-1]])
            return ref(input_ids=src[None], decoder_input_ids=dec[None], output_attentions=True)
        return ref(input_ids=torch.cat([src, tgt[:-1]])[None], output_attentions=True)


def test_equals_output_attentions_of_eager_mode(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    out = attention(model, batch, attribute_target=True, step_scores=["logprob"])
    assert_unchanged(model, before)  # sdpa again, no hooks left
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    n_src, n_tgt = len(src), len(tgt)
    ref = _reference(model, src, tgt, batch.decoder_start_id)
    assert out.extra_dims == ("layer", "head")
    assert out.source.shape == (1, n_tgt, n_src, 2, 4) and out.target.shape == (1, n_tgt, n_tgt, 2, 4)
    enc_dec = model.config.is_encoder_decoder
    for k in range(n_tgt):
        for layer in range(2):
            if enc_dec:
                want_src = ref.cross_attentions[layer][0, :, k, :]
                want_tgt = ref.decoder_attentions[layer][0, :, k, 1:k + 1]
            else:
                row = ref.attentions[layer][0, :, n_src - 1 + k]
                want_src, want_tgt = row[:, :n_src], row[:, n_src:n_src + k]
            torch.testing.assert_close(out.source[0, k, :, layer], want_src.T, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(out.target[0, k, :k, layer], want_tgt.T, rtol=1e-12, atol=1e-14)
        assert torch.all(out.target[0, k, k:] == 0)
    total = out.source.sum(2) + (0 if enc_dec else out.target.sum(2))
    torch.testing.assert_close(total, torch.ones_like(total))  # rows sum to 1
    if enc_dec:  # decoder self-attention: the start token takes the rest
        start = torch.stack([a[0, :, :n_tgt, 0] for a in ref.decoder_attentions]).permute(2, 0, 1)
        torch.testing.assert_close(out.target[0].sum(1) + start, torch.ones_like(start))
    logits = ref.logits[:, -n_tgt:]
    want = logprob(logits, tgt[None])
    torch.testing.assert_close(out.step_scores["logprob"], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.step_scores["probability"], probability(logits, tgt[None]))


def test_select_and_average(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    full = attention(model, batch)
    picked = attention(model, batch, layers=[-1], heads=[0, 2])
    torch.testing.assert_close(picked.source, full.source[..., 1:, :][..., [0, 2]], rtol=0, atol=0)
    mean = attention(model, batch, average=("layer", "head"))
    assert mean.extra_dims == () and mean.source.shape == full.source.shape[:3]
    torch.testing.assert_close(mean.source, full.source.mean((-1, -2)))
    heads = attention(model, batch, heads=[1], average=["layer"])
    assert heads.extra_dims == ("head",)
    torch.testing.assert_close(heads.source, full.source[..., [1]].mean(-2))
    if full.target is not None:
        torch.testing.assert_close(mean.target, full.target.mean((-1, -2)))


def test_encoder_self_attention_option(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = attention(model, batch, source_attention="encoder")
    ref = _reference(model, batch.source_ids[0], batch.target_ids[0], batch.decoder_start_id)
    assert out.extra_dims == ("layer", "head", "query") and out.target is None
    want = torch.stack(ref.encoder_attentions, 1)[0].permute(3, 0, 1, 2)  # [key layer head query]
    for k in range(out.source.shape[1]):
        torch.testing.assert_close(out.source[0, k], want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="attribute_target"):
        attention(model, batch, source_attention="encoder", attribute_target=True)


def test_batched_equals_single(any_model):
    model, tok = any_model
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    targets = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, targets)
    out = attention(model, batch, attribute_target=True)
    for i in range(len(sources)):
        one = attention(model, prepare(model, tok, sources[i], targets[i]), attribute_target=True)
        n_tgt, cols = one.target_ids.shape[1], batch.source_mask[i]
        # transformers' eager attention takes a float32 softmax (Llama): on some CPUs its last bit
        # depends on the row's length, 2^-26 at weights <= 1
        tol = {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(out.source[i, :n_tgt][:, cols], one.source[0], **tol)
        torch.testing.assert_close(out.target[i, :n_tgt, :n_tgt], one.target[0], **tol)
        assert torch.all(out.source[i, :, ~cols] == 0) and torch.all(out.source[i, n_tgt:] == 0)


def test_errors_name_the_argument(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    with pytest.raises(ValueError, match="`layers`"):
        attention(model, batch, layers=[2])
    with pytest.raises(ValueError, match="`heads`"):
        attention(model, batch, heads=[])
    with pytest.raises(ValueError, match="`average`"):
        attention(model, batch, average=["query"])
    if not model.config.is_encoder_decoder:
        with pytest.raises(ValueError, match="source_attention"):
            attention(model, batch, source_attention="encoder")


def test_model_unchanged_after_an_error_inside(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)

    def broken(logits, target_ids):
        raise ArithmeticError("broken target")

    with pytest.raises(ArithmeticError):
        attention(model, batch, broken)
    assert_unchanged(model, before)
    assert METHODS["attention"] is attention


def test_model_unchanged_after_an_error_during_the_eager_forward(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])

    def fail(module, args):
        assert model.config._attn_implementation == "eager"  # raised inside capture_attention
        raise ArithmeticError("inside the forward")

    handle = model.get_output_embeddings().register_forward_pre_hook(fail)
    try:
        before = snapshot(model)
        with pytest.raises(ArithmeticError, match="inside the forward"):
            attention(model, batch, attribute_target=True)
        assert_unchanged(model, before)
        assert {c._attn_implementation for c in _configs(model)} == {"sdpa"}
    finally:
        handle.remove()

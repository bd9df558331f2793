import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fnattr import prepare
from fnattr.hooks.value_zeroing import layer_stacks
from fnattr.hooks.value_zeroing import value_zeroing as zeroed_values
from fnattr.methods import METHODS
from fnattr.methods.value_zeroing import value_zeroing
from tests.conftest import _build
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is", " ran in the park"]


def _layer_state(model, layer, **inputs):
    """Output hidden states of `layer` in a plain forward (test-local hook, no fnattr capture)."""
    seen = []
    handle = layer.register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0][0, -1]


def _dist(a, b, similarity):
    return 1 - F.cosine_similarity(a, b, dim=-1) if similarity == "cosine" else (a - b).norm()


def _zeroed(model, layers, l, kind, j, seq, inputs, probe, similarity):
    clean = _layer_state(model, probe, **inputs)
    with zeroed_values(model, [l], None, attention=kind) as vz:
        vz.zero(F.one_hot(torch.tensor([j]), seq).bool())
        return _dist(_layer_state(model, probe, **inputs), clean, similarity)


def _reference(model, batch, b, k, similarity, output="decoder"):
    """Per-step loop for row b, step k: one full forward per (layer, zeroed token), unpadded prefix."""
    src = batch.source_ids[b][batch.source_mask[b]]
    tgt = batch.target_ids[b][batch.target_mask[b]]
    stacks = layer_stacks(model)
    dec = stacks["decoder"]
    if not model.config.is_encoder_decoder:
        ids = torch.cat([src, tgt[:k]])[None]
        d = torch.stack([torch.stack([_zeroed(model, dec, l, "decoder", j, ids.shape[1], {"input_ids": ids},
                                              dec[l], similarity) for l in range(len(dec))])
                         for j in range(ids.shape[1])])
        return d[:len(src)], d[len(src):]
    inputs = {"input_ids": src[None],
              "decoder_input_ids": torch.cat([torch.tensor([batch.decoder_start_id]), tgt[:k]])[None]}
    if output == "encoder_to_decoder":
        enc = stacks["encoder"]
        return torch.stack([torch.stack([_zeroed(model, enc, l, "encoder", i, len(src), inputs, dec[-1],
                                                 similarity) for l in range(len(enc))])
                            for i in range(len(src))]), None
    source = torch.stack([torch.stack([_zeroed(model, dec, l, "cross", i, len(src), inputs, dec[l],
                                               similarity) for l in range(len(dec))])
                          for i in range(len(src))])
    target = [torch.stack([_zeroed(model, dec, l, "decoder", j + 1, k + 1, inputs, dec[l], similarity)
                           for l in range(len(dec))]) for j in range(k)]
    return source, torch.stack(target) if target else source[:0]


def _check_against_reference(model, batch, out, similarity, output="decoder", rtol=1e-7):
    for b in range(len(batch)):
        src_cols = batch.source_mask[b].nonzero().squeeze(1)
        n_tgt = int(batch.target_mask[b].sum())
        for k in range(n_tgt):
            want_src, want_tgt = _reference(model, batch, b, k, similarity, output)
            torch.testing.assert_close(out.source[b, k, src_cols], want_src, rtol=rtol, atol=rtol * 1e-5)
            assert torch.all(out.source[b, k][~batch.source_mask[b]] == 0)
            if want_tgt is not None:
                torch.testing.assert_close(out.target[b, k, :k], want_tgt, rtol=rtol, atol=rtol * 1e-5)
                assert torch.all(out.target[b, k, k:] == 0)
        assert torch.all(out.source[b, n_tgt:] == 0)  # padding steps


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_one_pass_equals_per_step_loop(any_model, similarity):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = value_zeroing(model, batch, attribute_target=True, similarity=similarity,
                        internal_batch_size=5)
    n_layers = len(layer_stacks(model)["decoder"])
    assert out.extra_dims == ("layer",)
    assert out.source.shape == (*batch.source_ids.shape[:1], batch.target_ids.shape[1],
                                batch.source_ids.shape[1], n_layers)
    assert out.target.shape[:3] == (len(batch), batch.target_ids.shape[1], batch.target_ids.shape[1])
    assert out.source.abs().sum() > 0 and out.target.abs().sum() > 0
    _check_against_reference(model, batch, out, similarity)


def test_encoder_to_decoder_output_equals_per_step_loop(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = value_zeroing(model, batch, output="encoder_to_decoder")
    assert out.target is None
    assert out.source.shape[-1] == len(layer_stacks(model)["encoder"])
    assert out.source.abs().sum() > 0
    _check_against_reference(model, batch, out, "cosine", output="encoder_to_decoder")
    with pytest.warns(FutureWarning, match="encoder_to_decoder"):  # the old name still runs it
        old = value_zeroing(model, batch, output="encoder")
    torch.testing.assert_close(old.source, out.source, rtol=0, atol=0)


def _encoder_states(model, layer, src):
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model.get_encoder()(input_ids=src[None])
    finally:
        handle.remove()
    return seen[0][0]


def test_encoder_self_equals_full_encoder_forwards(seq2seq_model):
    """Encoder self scores (inseq's output_encoder_self_scores): zero source token i in encoder
    layer l, measure encoder layer l at every source position q; one unpadded encoder forward
    per (row, layer, token) as the reference."""
    model, tok = seq2seq_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = value_zeroing(model, batch, output="encoder_self")
    enc = layer_stacks(model)["encoder"]
    n_steps, n_src = batch.target_ids.shape[1], batch.source_ids.shape[1]
    assert out.extra_dims == ("layer", "query") and out.target is None
    assert out.source.shape == (len(batch), n_steps, n_src, len(enc), n_src)
    for b in range(len(batch)):
        cols = batch.source_mask[b]
        src = batch.source_ids[b][cols]
        for l, layer in enumerate(enc):
            clean = _encoder_states(model, layer, src)
            for i in range(len(src)):
                with zeroed_values(model, [l], None, attention="encoder") as vz:
                    vz.zero(F.one_hot(torch.tensor([i]), len(src)).bool())
                    want = _dist(_encoder_states(model, layer, src), clean, "cosine")
                got = out.source[b, 0, cols.nonzero()[i, 0], l][cols]
                torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
        assert torch.all(out.source[b][..., ~cols] == 0)  # padding queries
        n_tgt = int(batch.target_mask[b].sum())
        assert torch.equal(out.source[b, :n_tgt], out.source[b, :1].expand(n_tgt, -1, -1, -1))
    assert out.source.abs().sum() > 0
    with pytest.raises(ValueError, match="attribute_target"):
        value_zeroing(model, batch, output="encoder_self", attribute_target=True)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bart", "t5"])
def test_sdpa_and_eager_agree(decoder_tokenizer, seq2seq_tokenizer, name):
    tok = seq2seq_tokenizer if name in ("bart", "t5") else decoder_tokenizer
    results = []
    for impl in ("sdpa", "eager"):
        model = _build(name, len(tok))
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        # both rows: Llama's eager kernel takes a float32 softmax of float64 masks, which turns
        # a padded row into NaN inside the model itself unless the masks stay finite (finite_masks)
        batch = prepare(model, tok, SOURCES, TARGETS)
        before = snapshot(model)
        results.append(value_zeroing(model, batch, attribute_target=True))
        assert_unchanged(model, before)
        _check_against_reference(model, batch, results[-1], "cosine", rtol=1e-5)
    for side in ("source", "target"):  # eager kernels may take the softmax in float32
        torch.testing.assert_close(getattr(results[0], side), getattr(results[1], side),
                                   rtol=1e-5, atol=1e-10)
    assert results[0].source.abs().sum() > 0


def test_zeroing_nothing_gives_zero_scores(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = {"cross_heads": []} if model.config.is_encoder_decoder else {}
    out = value_zeroing(model, batch, attribute_target=True, decoder_heads=[], **kwargs)
    assert torch.all(out.source == 0) and torch.all(out.target == 0)
    assert out.step_scores["probability"].gt(0).all() == batch.target_mask.all()


def test_heads_and_per_layer_dict(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    full = value_zeroing(model, batch)
    one = value_zeroing(model, batch, decoder_heads=range(1, 2))
    per_layer = value_zeroing(model, batch, decoder_heads={1: [1]})
    assert not torch.allclose(full.source, one.source)
    assert torch.all(per_layer.source[..., 0] == 0)  # layer 0 not named in the dict
    torch.testing.assert_close(per_layer.source[..., 1], one.source[..., 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="decoder_heads"):
        value_zeroing(model, batch, decoder_heads={5: [0]})


def test_hand_computed_one_layer(decoder_tokenizer):
    """1-layer GPT2: the zeroed layer output computed by hand from the weights."""
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(decoder_tokenizer), n_positions=32, n_embd=16,
                                       n_layer=1, n_head=2)).double().eval()
    batch = prepare(model, decoder_tokenizer, ["The cat sat"], [" on the"])
    out = value_zeroing(model, batch, similarity="euclidean")
    ids = torch.cat([batch.source_ids[0], batch.target_ids[0, :-1]])
    block, n, d = model.transformer.h[0], len(ids), 8
    with torch.no_grad():
        x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(n))
        q, k, v = (block.ln_1(x) @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(16, -1)
        q, k, v = (t.view(n, 2, d).transpose(0, 1) for t in (q, k, v))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        attn = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, -math.inf).softmax(-1)

        def layer_out(values):
            x1 = x + (attn @ values).transpose(0, 1).reshape(n, 16) @ block.attn.c_proj.weight \
                + block.attn.c_proj.bias
            return x1 + block.mlp(block.ln_2(x1))

        clean = layer_out(v)
        n_src = batch.source_ids.shape[1]
        for step in range(batch.target_ids.shape[1]):
            query = n_src - 1 + step
            for j in range(query + 1):
                zeroed = layer_out(v.index_fill(1, torch.tensor([j]), 0))
                want = (zeroed[query] - clean[query]).norm()
                got = out.source[0, step, j, 0] if j < n_src else out.target[0, step, j - n_src, 0]
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)
                assert want > 0


def test_chunking_and_batching_invariant(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    whole = value_zeroing(model, batch, internal_batch_size=1000)
    small = value_zeroing(model, batch, internal_batch_size=3)
    torch.testing.assert_close(whole.source, small.source, rtol=1e-10, atol=1e-14)
    alone = value_zeroing(model, batch.select([1]))
    cols = batch.source_mask[1]
    torch.testing.assert_close(whole.source[1][:, cols][:len(alone.steps)],
                               alone.source[0][:, alone.source_mask[0]], rtol=1e-7, atol=1e-12)


def test_step_window_and_registry(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    assert METHODS["value_zeroing"] is value_zeroing
    full = value_zeroing(model, batch)
    part = value_zeroing(model, batch, attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, full.source[:, 1:3], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(part.target, full.target[:, 1:3], rtol=1e-10, atol=1e-14)
    source_only = value_zeroing(model, batch, attribute_target=False)
    assert source_only.target is None
    torch.testing.assert_close(source_only.source, full.source, rtol=1e-10, atol=1e-14)


def test_model_unchanged_after_error(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    with pytest.raises(ValueError, match="value heads"):
        value_zeroing(model, batch, attribute_target=True, decoder_heads=[99], cross_heads=[99])
    assert_unchanged(model, before)
    assert "get_interface" not in ALL_ATTENTION_FUNCTIONS.__dict__
    with pytest.raises((ValueError, TypeError), match="similarity"):  # TypeError under jaxtyping
        value_zeroing(model, batch, similarity="dot")
    if not model.config.is_encoder_decoder:
        for output in ("encoder", "encoder_self", "encoder_to_decoder"):
            with pytest.raises(ValueError, match="encoder-decoder"):
                value_zeroing(model, batch, output=output)

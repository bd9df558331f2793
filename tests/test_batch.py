import pytest
import torch

from fnattr import prepare
from tests.state import assert_unchanged, snapshot


def test_decoder_only_left_pads_sources_and_keeps_targets_as_continuations(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran in the park"])
    assert not batch.is_encoder_decoder
    # left padding: real tokens end every source row; BOS first among them
    assert batch.source_mask[:, -1].all() and not batch.source_mask[1, 0]
    assert batch.source_ids[1, ~batch.source_mask[1]].eq(batch.pad_id).all()
    assert batch.source_tokens[0][0] == "<s>"
    # targets are only the continuation, right padded, without special tokens
    assert "".join(batch.target_tokens[0][: int(batch.target_mask[0].sum())]) == " Paris."
    assert batch.target_mask[1].all() and not batch.target_mask[0, -1]
    assert batch.targets == (" Paris.", " ran in the park")


def test_encoder_decoder_targets_end_with_eos(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."])
    assert batch.is_encoder_decoder and batch.decoder_start_id == model.config.decoder_start_token_id
    assert batch.target_ids[0, -1] == tok.eos_token_id
    assert batch.source_ids[0, -1] == tok.eos_token_id


def test_generated_targets_are_greedy_continuations(any_model):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], max_new_tokens=5)
    for i, text in enumerate(["The capital of France is", "A dog"]):
        enc = tok(text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, 1:] if model.config.is_encoder_decoder else out[0, enc["input_ids"].shape[1]:]
        n = int(batch.target_mask[i].sum())
        assert batch.target_ids[i, :n].tolist() == new[:n].tolist()
        assert 1 <= n <= 5


def test_generation_kwargs_pass_through(gpt2):
    model, tok = gpt2
    torch.manual_seed(0)
    a = prepare(model, tok, ["A dog"], max_new_tokens=6, do_sample=True, top_k=50)
    torch.manual_seed(0)
    b = prepare(model, tok, ["A dog"], max_new_tokens=6, do_sample=True, top_k=50)
    assert torch.equal(a.target_ids, b.target_ids)


@pytest.mark.parametrize("sources,targets,match", [
    ([], None, "`sources` is empty"),
    ([""], None, r"`sources\[0\]` is an empty text"),
    (["ok", "  "], None, r"`sources\[1\]` is an empty text"),
    (["a", "b"], [" x"], "`targets` has 1 texts but `sources` has 2"),
    (["a"], [""], r"`targets\[0\]` is an empty text"),
])
def test_bad_input_names_the_argument(any_model, sources, targets, match):
    model, tok = any_model
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prepare(model, tok, sources, targets)
    assert_unchanged(model, before)


def test_bad_max_new_tokens(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="max_new_tokens"):
        prepare(model, tok, ["A dog"], max_new_tokens=0)


def test_select_drops_unused_padding(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran in the park"])
    one = batch.select([1])
    alone = prepare(model, tok, ["A dog"], [" ran in the park"])
    for field in ("source_ids", "source_mask", "target_ids", "target_mask"):
        assert torch.equal(getattr(one, field), getattr(alone, field)), field
    assert one.source_tokens == alone.source_tokens and one.targets == alone.targets

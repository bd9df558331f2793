import pytest
import torch

from fnattr import prepare
from fnattr.engine import embed, forward
from fnattr.hooks import embedding_hooks, frozen
from tests.state import assert_unchanged, snapshot


def test_replacing_embeddings_changes_the_forward(any_model):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."])
    with torch.no_grad(), embedding_hooks(model) as handle:
        emb = embed(handle, batch)
        base = forward(model, batch, handle, emb.source, emb.target, emb.start)
        again = forward(model, batch, handle, emb.source, emb.target, emb.start)
        scaled = forward(model, batch, handle, emb.source * 0.5, emb.target, emb.start)
    torch.testing.assert_close(base, again, rtol=0, atol=0)
    assert not torch.allclose(base, scaled)
    # Unhooked: the engine's teacher-forced logits are the model's own logits from ids.
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            dec = torch.cat([torch.tensor([[batch.decoder_start_id]]), batch.target_ids[:, :-1]], 1)
            plain = model(input_ids=batch.source_ids, decoder_input_ids=dec).logits
        else:
            ids = torch.cat([batch.source_ids, batch.target_ids[:, :-1]], 1)
            plain = model(input_ids=ids).logits[:, batch.source_ids.shape[1] - 1:]
    torch.testing.assert_close(base, plain, rtol=1e-12, atol=1e-12)


def test_hooks_removed_after_exception(any_model):
    model, tok = any_model
    before = snapshot(model)
    with pytest.raises(KeyError):
        with frozen(model), embedding_hooks(model) as handle:
            assert any(len(m._forward_hooks) for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            handle.replace(source=torch.zeros(1))
            raise KeyError("boom")
    assert_unchanged(model, before)


def test_wrong_shape_replacement_is_an_error_and_leaves_model_clean(gpt2):
    model, tok = gpt2
    before = snapshot(model)
    ids = tok("A dog", return_tensors="pt")["input_ids"]
    with embedding_hooks(model) as handle:
        handle.replace(source=torch.zeros(1, 99, model.config.n_embd, dtype=torch.float64))
        with pytest.raises(ValueError, match="replacement embeddings have shape"):
            model(input_ids=ids)
    assert_unchanged(model, before)


def test_unused_replacement_is_reported(gpt2):
    model, _ = gpt2
    with embedding_hooks(model) as handle:
        handle.replace(source=torch.zeros(1, 2, 32))
        with pytest.raises(RuntimeError, match="not used"):
            handle.check_used()


def test_frozen_restores_flags(gpt2):
    model, _ = gpt2
    model.transformer.h[0].requires_grad_(False)
    model.train()
    before = snapshot(model)
    try:
        with frozen(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert_unchanged(model, before)
    finally:
        model.requires_grad_(True)
        model.eval()

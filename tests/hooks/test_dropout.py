"""enable_dropout and the Monte-Carlo dropout target built on it."""

import pytest
import torch

from fnattr import prepare, targets
from fnattr.hooks import enable_dropout, frozen
from fnattr.hooks.dropout import DROPOUT_TYPES, functional_dropout_modules
from fnattr.methods import saliency
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran"]


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_enables_dropout_modules_only_and_restores(any_model):
    model, _ = any_model
    model.get_decoder().train()  # a mixed state must come back exactly
    try:
        before = _modes(model)
        with frozen(model), enable_dropout(model) as modules:
            # Llama's attention dropout rate is 0: nothing to enable. Bart calls dropout only
            # functionally, T5's attention too, GPT2's SDPA attention passes its module's rate:
            # their layers with a positive rate (or a dropout module) are switched.
            assert bool(modules) == (model.config.model_type != "llama")
            functional = functional_dropout_modules(model)
            assert bool(functional) == (model.config.model_type != "llama")
            for name, m in model.named_modules():
                assert m.training == (isinstance(m, DROPOUT_TYPES) or m in functional), name
                rates = {k: v for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)}
                owns = any(isinstance(c, DROPOUT_TYPES) and c.p > 0 for c in m.children())
                assert (m in functional) == (not isinstance(m, DROPOUT_TYPES) and (
                    owns or any(v > 0 for v in rates.values()))), name
        assert _modes(model) == before
    finally:
        model.eval()


def test_restores_after_an_error(gpt2):
    model, _ = gpt2
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"), enable_dropout(model):
        assert any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert_unchanged(model, before)


def test_dropout_changes_the_forward_only_inside(gpt2):
    model, tok = gpt2
    ids = tok("The cat sat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with enable_dropout(model):
            noisy = model(ids).logits
        again = model(ids).logits
    assert not torch.allclose(plain, noisy) and torch.equal(plain, again)


def test_mc_dropout_is_seeded_and_leaves_model_and_rng_alone(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    if model.config.model_type == "llama":  # attention dropout rate 0, no module: a clear error
        with pytest.raises(ValueError, match="no dropout with a rate above 0"):
            targets.mc_dropout_prob_avg(model, batch)
        return
    before, rng = snapshot(model), torch.get_rng_state()
    logits = torch.zeros(len(batch), batch.target_ids.shape[1], 3, dtype=torch.float64)
    runs = [targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=4, seed=s, internal_batch_size=3)
            for s in (0, 0, 1)]
    a, b, c = (fn(logits, batch.target_ids) for fn in runs)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = targets.probability(_logits(model, batch), batch.target_ids)
    assert not torch.allclose(a, p)  # dropout was active
    assert torch.all((a > 0) & (a < 1))
    # more samples pull the average towards the same value, whatever the seed
    far = (a - c).abs().max()
    many = [targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=64, seed=s)(logits, batch.target_ids)
            for s in (0, 1)]
    assert (many[0] - many[1]).abs().max() < far


def _logits(model, batch):
    from fnattr.engine import embed, forward
    from fnattr.hooks import embedding_hooks
    with torch.no_grad(), embedding_hooks(model) as h:
        emb = embed(h, batch)
        return forward(model, batch, h, emb.source, emb.target, emb.start)


def test_mc_dropout_as_step_score_and_target(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    mcd = targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=3)
    out = saliency(model, batch, mcd, step_scores=[mcd, "probability"], attr_pos_end=2)
    want = mcd(torch.zeros(2, batch.target_ids.shape[1], 1, dtype=torch.float64), batch.target_ids)
    torch.testing.assert_close(out.step_scores["mc_dropout_prob_avg"],
                               (want * batch.target_mask)[:, :2])
    assert torch.all(out.source == 0)  # a constant of the input has no gradient
    with pytest.raises(ValueError, match="n_mcd_steps"):
        targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=0)


def test_layerdrop_is_held_at_zero_and_restored(request):
    from tests.conftest import _get
    model, _ = _get(request, "bart")
    enc = model.get_encoder()
    enc.layerdrop = 0.5
    try:
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="inside"), enable_dropout(model):
            assert enc.training and enc.layerdrop == 0.0
            raise RuntimeError("inside")
        assert enc.layerdrop == 0.5
        assert_unchanged(model, before)
    finally:
        enc.layerdrop = 0.0

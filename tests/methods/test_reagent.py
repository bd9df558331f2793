import types

import pytest
import torch
from torch import nn

from fnattr import prepare
from fnattr.methods import METHODS
from fnattr.methods.reagent import credit, kept, reagent
from fnattr.targets import probability
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is", " ran in the park"]
FAST = {"max_probe_steps": 4, "num_probes": 4}


class OneToken(nn.Module):
    """A stand-in replacing LM that always proposes token `token`."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        logits = torch.full((*input_ids.shape, self.vocab), -torch.inf)
        logits[..., self.token] = 0.0
        return types.SimpleNamespace(logits=logits)


def test_seeded_reproducibility(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    a = reagent(model, batch, generator=3, attribute_target=True, **FAST)
    b = reagent(model, batch, generator=torch.Generator().manual_seed(3), attribute_target=True, **FAST)
    c = reagent(model, batch, generator=4, attribute_target=True, **FAST)
    assert torch.equal(a.source, b.source) and torch.equal(a.target, b.target)
    assert not torch.equal(a.source, c.source)
    assert a.source.shape == (2, batch.target_ids.shape[1], batch.source_ids.shape[1])
    assert a.target.shape == (2, batch.target_ids.shape[1], batch.target_ids.shape[1])
    assert a.extra_dims == () and METHODS["reagent"] is reagent
    # padding, special tokens and tokens a step cannot see score exactly 0
    step_mask = batch.target_mask[:, a.steps]
    ordinary = batch.source_mask & ~batch.source_special
    assert torch.all(a.source[~step_mask] == 0)
    assert torch.all(a.source.masked_select(~ordinary[:, None, :]) == 0)
    assert torch.all(a.target.triu() == 0)
    assert a.source.abs().sum() > 0 and a.target.abs().sum() > 0


def test_no_nan_when_the_stopping_condition_is_never_met(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    banned = batch.target_ids.unique()

    def never_top(module, args, out):  # the targets are never among the top-k
        out = out.clone()
        out[..., banned] -= 1e4
        return out
    handle = model.get_output_embeddings().register_forward_hook(never_top)
    try:
        out = reagent(model, batch, stopping_condition_top_k=1, **FAST)
    finally:
        handle.remove()
    step_mask = batch.target_mask[:, out.steps]
    assert torch.isfinite(out.source).all() and torch.isfinite(out.target).all()
    assert torch.all(out.step_scores["reagent_converged"] == 0)
    assert torch.all(out.step_scores["reagent_probe_steps"][step_mask] == FAST["max_probe_steps"])
    assert out.meta["reagent_unconverged"] == str(int(step_mask.sum()))


def test_stops_at_once_when_the_condition_always_holds(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = reagent(model, batch, stopping_condition_top_k=10_000, **FAST)
    step_mask = batch.target_mask[:, out.steps]
    assert torch.equal(out.step_scores["reagent_converged"], step_mask.double())
    assert torch.equal(out.step_scores["reagent_probe_steps"], step_mask.double())
    assert out.meta["reagent_unconverged"] == "0" and out.target is None


def test_inverted_condition(gpt2):
    """invert_keep: a step stops once replacing its top tokens pushes the target out of the
    top-k, which never happens when k spans the vocabulary."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    step_mask = batch.target_mask.double()
    never = reagent(model, batch, invert_keep=True, stopping_condition_top_k=10_000, **FAST)
    assert torch.all(never.step_scores["reagent_converged"] == 0)
    assert torch.isfinite(never.source).all()
    always = reagent(model, batch, invert_keep=True, stopping_condition_top_k=1, keep_top_n=100,
                     max_probe_steps=1, num_probes=1)
    # keep_top_n=100 replaces every visible token: the (seeded) target is then mostly not the argmax
    assert always.step_scores["reagent_converged"].sum() >= 1
    assert torch.all(always.step_scores["reagent_converged"] <= step_mask)


def test_replace_everything_equals_per_step_reference(any_model):
    """replacing_ratio=1 with a one-token proposer: the score of every visible ordinary token is
    f(prefix) - f(prefix with all ordinary tokens replaced), step by step, from plain forwards."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    unk = tok.unk_token_id
    proposer = OneToken(model.config.vocab_size, unk)
    out = reagent(model, batch, replacing_ratio=1.0, num_probes=1, max_probe_steps=1,
                  replacing_model=proposer, attribute_target=True)
    start = batch.decoder_start_id
    for b in range(len(batch)):
        src = batch.source_ids[b][batch.source_mask[b]]
        tgt = batch.target_ids[b][batch.target_mask[b]]
        src_special = batch.source_special[b][batch.source_mask[b]]
        tgt_special = batch.target_special[b][batch.target_mask[b]]
        cols = batch.source_mask[b].nonzero().squeeze(1)
        for k in range(len(tgt)):
            clean = step_score(model, *prefix_inputs(model, src, tgt, k, start), int(tgt[k]), probability)
            swapped = prefix_inputs(model, src.masked_fill(~src_special, unk),
                                    tgt.masked_fill(~tgt_special, unk), k, start)
            drop = clean - step_score(model, *swapped, int(tgt[k]), probability)
            want_src = drop * (~src_special)
            want_tgt = drop * (~tgt_special[:k])
            torch.testing.assert_close(out.source[b, k, cols], want_src, rtol=1e-9, atol=1e-14)
            torch.testing.assert_close(out.target[b, k, :k], want_tgt, rtol=1e-9, atol=1e-14)
            assert drop.abs() > 0
    nothing = reagent(model, batch, replacing_ratio=0.0, num_probes=2, max_probe_steps=2,
                      replacing_model=proposer, attribute_target=True)
    torch.testing.assert_close(nothing.source, torch.zeros_like(nothing.source), rtol=0, atol=1e-15)


def test_kept_and_credit_by_hand():
    imp = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    vis = torch.tensor([[True, True, True, False]])
    assert kept(imp, vis, 2, None, False).tolist() == [[True, False, True, False]]
    assert kept(imp, vis, 2, None, True).tolist() == [[False, True, False, False]]
    assert kept(imp, vis, 3, 0.5, False).tolist() == [[True, False, True, False]]  # ceil(1.5)
    assert kept(imp, vis, 10, None, False).tolist() == [[True, True, True, False]]
    drop = torch.tensor([[[0.2]], [[0.5]]])                      # [probe batch step]
    swapped = torch.tensor([[[True, False, True]], [[False, False, True]]])
    visible = torch.tensor([[[True, True, False]]])
    assert torch.allclose(credit(drop, swapped, visible), torch.tensor([[[0.2 - 0.5, -0.7, 0.0]]]))


def test_model_unchanged_also_after_an_error(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    reagent(model, batch, **FAST)
    assert_unchanged(model, before)
    calls = []

    def failing(logits, target_ids):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return probability(logits, target_ids)
    with pytest.raises(RuntimeError, match="boom"):
        reagent(model, batch, failing, **FAST)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, name", [
    ({"keep_top_n": None}, "keep_top_n"), ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"replacing_ratio": -0.1}, "replacing_ratio"), ({"num_probes": 0}, "num_probes"),
    ({"max_probe_steps": 0}, "max_probe_steps"), ({"stopping_condition_top_k": 0}, "stopping"),
])
def test_validation(gpt2, kwargs, name):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    with pytest.raises(ValueError, match=name):
        reagent(model, batch, **kwargs)

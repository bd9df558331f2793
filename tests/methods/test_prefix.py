"""Perturbations that run from their first changed position on the clean key/value cache
(`fnattr.methods._prefix`): the same scores as whole forwards, for less work."""

import pytest
import torch

from fnattr import prepare
from fnattr.contrast import prepare_contrast
from fnattr.evaluate import faithfulness
from fnattr.methods import _prefix, lime, occlusion, saliency
from fnattr.attribution import attribution_context
from fnattr.targets import contrast_prob_diff, logprob, probability
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a", " ran in the park"]
LONG = ["The quick brown fox jumps over the lazy dog. The cat sat on the mat. Rome is a city in",
        "Language models predict the next token. Paris is a city in"]


@pytest.fixture
def whole_forwards(monkeypatch):
    """Turn the prefix cache off: every perturbation runs the whole input."""
    monkeypatch.setattr(_prefix, "prefix", lambda ctx, target_fn, masks=None: None)


class Positions:
    """Counts the input positions the model embeds (a proxy for forward work)."""

    def __init__(self, model):
        self.total = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.total += output.shape[0] * output.shape[1]


def _both(monkeypatch, model, run):
    """`run()` with the prefix cache, then with whole forwards; and the positions each embedded."""
    counter = Positions(model)
    try:
        fast = run()
        fast_positions, counter.total = counter.total, 0
        with monkeypatch.context() as m:
            m.setattr(_prefix, "prefix", lambda ctx, target_fn, masks=None: None)
            slow = run()
        return fast, slow, fast_positions, counter.total
    finally:
        counter.handle.remove()


@pytest.mark.parametrize("opts", [{}, {"window": 2, "attribute_target": True},
                                  {"window": 3, "stride": 2, "attribute_target": True}])
def test_occlusion_equals_whole_forwards_for_less_work(decoder_model, monkeypatch, opts):
    model, tok = decoder_model
    batch = prepare(model, tok, LONG, [" Italy.", " France."])  # left-padded second row
    before = snapshot(model)
    fast, slow, fast_pos, slow_pos = _both(monkeypatch, model, lambda: occlusion(
        model, batch, logprob, internal_batch_size=4, **opts))
    torch.testing.assert_close(fast.source, slow.source, rtol=0, atol=1e-12)
    if slow.target is not None:
        torch.testing.assert_close(fast.target, slow.target, rtol=0, atol=1e-12)
    assert slow.source.abs().max() > 0
    # each copy runs from its first changed position: about half the positions, plus one
    # clean forward with its cache, and chunks that start at their earliest change
    assert fast_pos < 0.7 * slow_pos
    assert_unchanged(model, before)


def test_lime_and_faithfulness_equal_whole_forwards(gpt2, monkeypatch):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    monkeypatch.setattr(_prefix, "MIN_SAVING", 0.0)  # LIME's random masks change early: force it
    fast, slow, fast_pos, slow_pos = _both(monkeypatch, model, lambda: lime(
        model, batch, n_samples=24, seed=3, internal_batch_size=8))
    torch.testing.assert_close(fast.source, slow.source, rtol=0, atol=1e-10)
    out = saliency(model, batch)
    fast, slow, *_ = _both(monkeypatch, model, lambda: faithfulness(
        model, batch, out, removal="unk", n_random=0, curve_levels=4))
    for name in ("comprehensiveness", "sufficiency"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=1e-12)


def test_whole_forwards_where_the_cache_cannot_serve(seq2seq_model, gpt2):
    model, tok = seq2seq_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        assert _prefix.prefix(ctx, probability) is None  # encoder-decoder: the encoder sees all
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a", " sat on the mat"])
    target = contrast_prob_diff(contrast)
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        assert _prefix.prefix(ctx, target) is None  # the contrast reruns at each copy
        assert _prefix.prefix(ctx, probability) is not None


def test_a_sliding_window_cache_is_refused_without_a_forward(decoder_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(decoder_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)).eval()
    batch = prepare(model, decoder_tokenizer, SOURCES, TARGETS)
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        counter = Positions(model)
        try:  # a cropped sliding-window cache is not the prefix's: no clean forward is spent
            assert _prefix.prefix(ctx, probability) is None and counter.total == 0
        finally:
            counter.handle.remove()


def test_lime_masks_save_too_little_to_pay_for_the_cache(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, LONG, [" Italy.", " France."])
    g = torch.Generator().manual_seed(0)
    src = torch.rand(64, batch.source_ids.shape[1], generator=g) < 0.5  # LIME: keep_prob 0.5
    tgt = torch.zeros(64, batch.target_ids.shape[1], dtype=torch.bool)
    assert _prefix.saving((src, tgt)) < _prefix.MIN_SAVING
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        assert _prefix.prefix(ctx, probability, (src, tgt)) is None


def test_chunks_cost_least(monkeypatch):
    import itertools

    monkeypatch.setattr(_prefix, "CALL_COST", 3)

    def cost(parts, starts, n_seq):
        return sum(3 + (p.stop - p.start) * (n_seq - starts[p.start]) for p in parts)

    starts, n_seq = [0, 1, 2, 2, 5, 8, 9, 9], 10
    got = _prefix.chunks(starts, n_seq, 4)
    assert [i for p in got for i in range(p.start, p.stop)] == list(range(len(starts)))
    assert all(p.stop - p.start <= 4 for p in got)
    every = []  # every split into consecutive runs of at most 4: none costs less
    for cuts in itertools.product([0, 1], repeat=len(starts) - 1):
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], len(starts)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        if all(p.stop - p.start <= 4 for p in parts):
            every.append(cost(parts, starts, n_seq))
    assert cost(got, starts, n_seq) == min(every)
    assert _prefix.chunks([0] * 5, 10, 2) == [slice(0, 1), slice(1, 3), slice(3, 5)]
    assert _prefix.chunks([], 10, 4) == []


def test_first_changed_position():
    src = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    tgt = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # input = source, then target tokens but the last: positions 0..4
    assert _prefix.first_changed((src, tgt)).tolist() == [1, 4, 5]
    dims = src[:, :, None].expand(3, 3, 2).clone()
    dims[0, 1, 0] = False  # one coordinate of a position still changes it
    assert _prefix.first_changed((dims, tgt[:, :, None].expand(3, 3, 2))).tolist() == [1, 4, 5]

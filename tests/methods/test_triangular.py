"""Per-step gradients on a forward in pieces (`fnattr.methods._triangular`): the same values as
one whole forward and its batched backward, with each step group's backward over its prefix."""

import itertools

import pytest
import torch

from fnattr import prepare
from fnattr.contrast import prepare_contrast
from fnattr.engine import step_gradients
from fnattr.methods import (
    _triangular, discretized_integrated_gradients, gradient_shap, integrated_gradients,
    layer_integrated_gradients, saliency, sequential_integrated_gradients,
)
from fnattr.attribution import attribution_context, run_scored
from fnattr.targets import contrast_prob_diff, logprob
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park"]


def _whole(ctx, target_fn, src, tgt, inputs):
    out, scores = run_scored(ctx, target_fn, src, tgt)
    return step_gradients(scores, inputs, out.at(ctx.steps))


@pytest.mark.parametrize("parts_of", [lambda n: [(0, n)], lambda n: [(0, 1), (1, n)],
                                      lambda n: [(i, i + 1) for i in range(n)]])
@pytest.mark.parametrize("span", [(None, None), (1, -1)])
def test_pieces_give_the_whole_forwards_gradients(decoder_model, monkeypatch, parts_of, span):
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES, TARGETS)  # the second row is padded
    before = snapshot(model)
    with attribution_context(model, batch, attribute_target=True, attr_pos_start=span[0],
                             attr_pos_end=span[1]) as ctx:
        src = ctx.embedded.source.clone().requires_grad_()
        tgt = ctx.embedded.target.clone().requires_grad_()
        parts = parts_of(len(ctx.steps))
        monkeypatch.setattr(_triangular, "plan", lambda *a, **k: parts)
        got = _triangular.gradients(ctx, logprob, src, tgt, [src, tgt])
        want = _whole(ctx, logprob, src, tgt, [src, tgt])
    for g, w in zip(got.grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert got.grads[0].abs().sum() > 0 and got.grads[1].abs().sum() > 0
    assert_unchanged(model, before)


RUNS = {  # every method whose gradients come from `_triangular.gradients`, with light settings
    "saliency": lambda m, b: saliency(m, b, attribute_target=True),
    "integrated_gradients": lambda m, b: integrated_gradients(m, b, n_steps=4, internal_batch_size=3),
    "gradient_shap": lambda m, b: gradient_shap(m, b, n_samples=3, stdevs=0.1, internal_batch_size=4),
    "discretized_integrated_gradients": lambda m, b: discretized_integrated_gradients(
        m, b, n_steps=3, n_neighbors=8, points_per_segment=2, internal_batch_size=5),
    "sequential_integrated_gradients": lambda m, b: sequential_integrated_gradients(
        m, b, n_steps=2, internal_batch_size=7),
    # the layer's replaced outputs read piece by piece, at the embeddings and inside the model
    "layer_integrated_gradients": lambda m, b: layer_integrated_gradients(
        m, b, n_steps=3, internal_batch_size=5, attribute_target=True),
    "layer_integrated_gradients at a block": lambda m, b: layer_integrated_gradients(
        m, b, layer="transformer.h.0", n_steps=3, internal_batch_size=4, attribute_target=True),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_methods_with_pieces_equal_one_forward(gpt2, monkeypatch, method):
    """Each method end to end, with the cost model forced to split into single steps."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    for name in ("FORWARD_CALL", "TRAVERSAL", "BACKWARD_CALL"):
        monkeypatch.setattr(_triangular, name, 0)
    calls = []
    plan = _triangular.plan
    monkeypatch.setattr(_triangular, "plan", lambda *a: calls.append(plan(*a)) or calls[-1])
    fast = RUNS[method](model, batch)
    assert calls and all(p is not None and len(p) > 1 for p in calls), calls
    monkeypatch.setattr(_triangular, "plan", lambda *a: None)
    slow = RUNS[method](model, batch)
    assert fast.source.abs().sum() > 0
    for field in ("source", "target", "delta"):
        a, b = getattr(fast, field), getattr(slow, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_pieces_cover_the_steps_and_split_only_where_it_pays():
    for reads, rows, cap in [(list(range(8, 28)), 64, 1), (list(range(20, 40)), 1, 32),
                             (list(range(5, 6)), 4, 8), (list(range(3, 200)), 16, 2)]:
        parts = _triangular.pieces(reads, rows, cap)
        assert parts[0][0] == 0 and parts[-1][1] == len(reads)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(parts))
        assert len(parts) <= _triangular.MAX_PIECES
    # large step x row backwards split (measured 1.2-1.3x less CPU), one small row does not
    assert len(_triangular.pieces(list(range(8, 28)), 64, 1)) > 1
    assert _triangular.pieces(list(range(20, 40)), 1, 32) == [(0, 20)]


def test_plan_keeps_one_forward_where_pieces_are_not_exact(gpt2, seq2seq_model, monkeypatch):
    for name in ("FORWARD_CALL", "TRAVERSAL", "BACKWARD_CALL"):  # where they would pay
        monkeypatch.setattr(_triangular, name, 0)
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city", " sat in the park"])
    with attribution_context(model, batch, attribute_target=True, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        assert _triangular.plan(ctx, logprob, 64) is not None
        assert _triangular.plan(ctx, contrast_prob_diff(contrast), 64) is None
    s2s, s2s_tok = seq2seq_model
    batch = prepare(s2s, s2s_tok, SOURCES, TARGETS)
    with attribution_context(s2s, batch, attribute_target=True, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        assert _triangular.plan(ctx, logprob, 64) is None


@pytest.mark.parametrize("rows", [[1], [0], [0, 1]])
def test_a_chunk_runs_without_the_columns_its_rows_leave_padded(any_model, monkeypatch, rows):
    """Rows of a padded batch, run on their own columns only, give the full width's gradients:
    zero at the dropped columns and at the steps after their targets end."""
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris", " ran in the park today"])
    idx = torch.tensor(rows)
    with attribution_context(model, batch, attribute_target=True, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        src = ctx.embedded.source[idx].clone().requires_grad_()
        tgt = ctx.embedded.target[idx].clone().requires_grad_()
        assert (_triangular._cropped(ctx, logprob, idx) is None) == (rows == [0, 1])
        got = _triangular.gradients(ctx, logprob, src, tgt, [src, tgt], idx)
        monkeypatch.setattr(_triangular, "_cropped", lambda *a: None)
        want = _triangular.gradients(ctx, logprob, src, tgt, [src, tgt], idx)
    for g, w in zip(got.grads, want.grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    real = batch.target_mask[idx]
    torch.testing.assert_close(got.scores * real, want.scores * real, rtol=0, atol=1e-12)
    assert got.grads[0].abs().sum() > 0


@pytest.mark.parametrize("copies", [2, 32])
def test_replicated_rows_give_the_batched_backwards_gradients(any_model, monkeypatch, copies):
    """The compiled model's path (m copies of each row for m steps, one plain backward), run on
    the eager model: the batched backward's values, in one group of steps or in several."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    monkeypatch.setattr("fnattr.engine.CPU_COPIES_PER_BACKWARD", copies)
    with attribution_context(model, batch, attribute_target=True, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        src = ctx.embedded.source.clone().requires_grad_()
        tgt = ctx.embedded.target.clone().requires_grad_()
        got = _triangular._replicated(ctx, logprob, src, tgt, [src, tgt], None)
        want_scores = run_scored(ctx, logprob, src, tgt)[1]
        want = _whole(ctx, logprob, src, tgt, [src, tgt])
        assert _triangular._replicated(ctx, logprob, src, tgt, [src * 1, tgt], None) is None
    for g, w in zip(got.grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.scores, want_scores.detach(), rtol=0, atol=1e-12)
    assert got.grads[0].abs().sum() > 0


def test_layer_ig_chunks_run_without_the_padding_columns(any_model, monkeypatch):
    """Layer IG on a padded batch, one row per chunk: each chunk's layer outputs are cut to its
    row's columns (per call role: joint, encoder, decoder), with the full width's results."""
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris", " ran in the park today"])
    crops = []
    cropped = _triangular._cropped
    monkeypatch.setattr(_triangular, "_cropped", lambda *a: crops.append(cropped(*a)) or crops[-1])
    run = lambda: layer_integrated_gradients(model, batch, n_steps=2, internal_batch_size=1,  # noqa: E731
                                             attribute_target=True)
    got = run()
    assert any(c is not None for c in crops)
    monkeypatch.setattr(_triangular, "_cropped", lambda *a: None)
    want = run()
    assert got.source.abs().sum() > 0
    for field in ("source", "target", "delta"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=1e-12)

"""Rows of like length together (`fnattr.methods._buckets`): each bucket runs without the columns
its rows leave padded, and the results equal one padded batch's."""

import pytest
import torch

from fnattr import prepare
from fnattr.methods import _buckets, _triangular, gradient_shap, integrated_gradients, saliency

SOURCES = ["A dog", "The capital of France is a city", "A cat"]
TARGETS = [" ran", " Paris is the capital of the country", " sat"]


def test_buckets_sort_by_length_and_cut_where_padding_costs_more_than_a_call(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    parts = _buckets.buckets(batch, [0, 1, 2], 16, 64)
    assert sorted(r for p in parts for r in p) == [0, 1, 2]
    assert parts == [[0, 2], [1]]  # the long row alone, the short ones together
    assert _buckets.buckets(batch, [0, 1, 2], 8, 64) == [[0, 2, 1]]  # a bucket holds 16 copies
    same = prepare(model, tok, ["A dog", "A cat"], [" ran", " sat"])
    assert _buckets.buckets(same, [0, 1], 8, 64) == [[0, 1]]  # no padding to save
    chunks = _buckets.chunks(batch, [0, 1, 2], 16, 5)
    assert sorted(p for c in chunks for p in c) == [(c, r) for c in range(16) for r in range(3)]
    assert all(len({r in (0, 2) for _, r in c}) == 1 and len(c) <= 5 for c in chunks)


RUNS = {
    "saliency": lambda m, b: saliency(m, b, attribute_target=True),
    "integrated_gradients": lambda m, b: integrated_gradients(m, b, n_steps=2, internal_batch_size=4),
    "gradient_shap": lambda m, b: gradient_shap(m, b, n_samples=2, stdevs=0.1, internal_batch_size=4),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_buckets_give_the_padded_batchs_results(any_model, monkeypatch, method):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    monkeypatch.setattr(_buckets, "MIN_COPIES", 1)
    monkeypatch.setattr(_buckets, "CHUNK_CALL", 0)  # every row its own bucket
    crops = []
    cropped = _triangular._cropped
    monkeypatch.setattr(_triangular, "_cropped", lambda *a: crops.append(cropped(*a)) or crops[-1])
    split = RUNS[method](model, batch)
    assert any(c is not None for c in crops)
    monkeypatch.setattr(_buckets, "buckets", lambda b, rows, *a, **k: [list(rows)])
    monkeypatch.setattr(_triangular, "_cropped", lambda *a: None)
    whole = RUNS[method](model, batch)
    assert split.source.abs().sum() > 0
    for field in ("source", "target", "delta"):
        a, b = getattr(split, field), getattr(whole, field)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    real = batch.target_mask[:, split.steps]
    for name, score in split.step_scores.items():
        torch.testing.assert_close(score * real, whole.step_scores[name] * real, rtol=1e-9, atol=1e-12)

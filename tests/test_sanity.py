import math

import numpy as np
import pytest
import torch

from fnattr import prepare
from fnattr.hooks.randomized import layer_stack
from fnattr.methods import input_x_gradient, integrated_gradients
from fnattr.sanity import RandomizationResult, load, model_randomization, spearman
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog ran in the"], [" Paris is a city", " park."]


# ---- spearman -----------------------------------------------------------------------------

def test_spearman_by_hand_with_ties():
    # ranks of a: [1, 2.5, 2.5, 4]; of b: [4, 3, 2, 1]; centred: [-1.5, 0, 0, 1.5], [1.5, .5, -.5, -1.5]
    # sum of products -4.5; sums of squares 4.5 and 5: rho = -4.5 / sqrt(22.5)
    a, b = torch.tensor([1.0, 2, 2, 3]), torch.tensor([4.0, 3, 2, 1])
    assert spearman(a, b).item() == pytest.approx(-4.5 / math.sqrt(22.5), abs=1e-15)
    assert spearman(a, a).item() == pytest.approx(1.0, abs=1e-15)
    x = torch.tensor([0.3, -2.0, 5.0, 1.0, 0.0])
    assert spearman(x, x.exp()).item() == pytest.approx(1.0)  # only the order counts
    assert spearman(x, -x**3).item() == pytest.approx(-1.0)


def test_spearman_mask_batch_and_undefined_cases():
    a = torch.tensor([[1.0, 2, 2, 3, 100], [1.0, 2, 3, 4, 5]])
    b = torch.tensor([[4.0, 3, 2, 1, -100], [1.0, 1, 1, 1, 1]])
    mask = torch.tensor([[True, True, True, True, False], [True] * 5])
    rho = spearman(a, b, mask)
    assert rho.shape == (2,) and rho.dtype == torch.float64
    assert rho[0].item() == pytest.approx(-4.5 / math.sqrt(22.5))  # the masked pair is left out
    assert rho[1].isnan()  # all of b tied: undefined
    one = torch.tensor([[True, False, False, False, False]] * 2)
    assert spearman(a, b, one).isnan().all()  # fewer than 2 entries
    assert spearman(torch.tensor([1.0, math.nan, 3]), torch.tensor([1.0, 2, 3])).isnan()
    assert spearman(torch.tensor([1.0, math.nan, 3]), torch.tensor([1.0, 2, 3]),
                    torch.tensor([True, False, True])).item() == pytest.approx(1.0)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (20, 30), generator=g).double()  # many ties
    b = a + torch.randint(0, 4, (20, 30), generator=g).double()
    want = [stats.spearmanr(x.numpy(), y.numpy()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b).numpy(), want, rtol=1e-12)


# ---- model_randomization --------------------------------------------------------------------

def _batch(model, tok):
    return prepare(model, tok, SOURCES, TARGETS)


def _real(res: RandomizationResult, values: torch.Tensor) -> torch.Tensor:
    return values[:, res.step_mask]


def test_unchanged_weights_give_one(any_model):
    model, tok = any_model
    batch = _batch(model, tok)
    bottom = layer_stack(model)[-1]
    same = model_randomization(model, batch, input_x_gradient, layers=bottom, init=lambda t, g: t)
    assert same.stages == (bottom,) and same.randomized == ((bottom,),)
    for values in (same.spearman, same.spearman_abs):
        real = _real(same, values)
        torch.testing.assert_close(real, torch.ones_like(real), rtol=0, atol=1e-12)
    assert (~same.step_mask).any() and same.spearman[:, ~same.step_mask].isnan().all()  # padding


def test_small_changes_keep_the_correlation_high(gpt2):
    model, tok = gpt2

    def nudge(t, g):  # 0.1% of each tensor's own spread
        return t + 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype) * t.std()

    near = model_randomization(model, _batch(model, tok), input_x_gradient, init=nudge)
    assert near.mean().min() > 0.9, near.summary()


def test_correlation_drops_as_blocks_are_randomised(any_model):
    model, tok = any_model
    batch, before = _batch(model, tok), snapshot(model)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = np.random.get_state()[1].copy(), torch.get_rng_state(), cuda
    res = model_randomization(model, batch, "input_x_gradient")
    stack = layer_stack(model)
    assert res.stages == stack
    assert res.randomized == tuple(stack[: s + 1] for s in range(len(stack)))  # cascading
    assert res.spearman.shape == (len(stack), 2, len(batch.target_ids[0]))
    # unchanged weights give 1 and 0.1% changes more than 0.9 (tests above); a randomised block
    # decorrelates the attributions already (these tiny models are random themselves, so the top
    # block matters as much as any), and with every block randomised little correlation is left
    means = res.mean()
    assert means.max() < 0.6 and means[-1] < 0.3, res.summary()
    assert_unchanged(model, before)
    assert np.array_equal(np.random.get_state()[1], rng[0]) and torch.equal(torch.get_rng_state(), rng[1])
    assert all(map(torch.equal, torch.cuda.get_rng_state_all() if cuda else [], cuda))


def test_integrated_gradients_with_options_one_layer_at_a_time(gpt2):
    model, tok = gpt2
    batch = _batch(model, tok)
    res = model_randomization(model, batch, integrated_gradients, cascading=False, n_steps=4)
    assert res.stages == ("transformer.h.1", "transformer.h.0")
    assert res.randomized == (("transformer.h.1",), ("transformer.h.0",))
    assert res.meta["method"] == "integrated_gradients" and '"n_steps": 4' in res.meta["args"]
    assert res.meta["reduction"] == "sum over hidden" and res.meta["cascading"] == "false"
    assert (res.mean() < 0.8).all(), res.summary()


def test_stage_groups_tied_head_and_reduction(gpt2):
    model, tok = gpt2
    batch, before = _batch(model, tok), snapshot(model)
    with pytest.raises(ValueError, match="`layers`.*tied"):
        model_randomization(model, batch, "saliency", layers=[["lm_head", "transformer.ln_f"]])
    res = model_randomization(model, batch, "saliency", layers=[["lm_head", "transformer.ln_f"],
                              "transformer.h.1"], tied="untie", reduction="max")
    assert res.stages == ("lm_head+transformer.ln_f", "transformer.h.1")
    assert res.randomized[1] == ("lm_head", "transformer.ln_f", "transformer.h.1")
    assert res.meta["reduction"] == "max over hidden" and res.meta["tied"] == "untie"
    assert_unchanged(model, before)


def test_bad_arguments_raise_before_the_model_runs(gpt2):
    model, tok = gpt2
    batch, before = _batch(model, tok), snapshot(model)
    calls = []

    def method(model, batch, target_fn, **options):
        calls.append(options)
        return input_x_gradient(model, batch, target_fn)

    bad = [({"layers": ["transformer.h.1", "transformer.h.9"]}, ValueError, r"`layers`.*transformer.h.9"),
           ({"layers": []}, ValueError, "`layers` names no stage"),
           ({"layers": "transformer.wte"}, ValueError, "`layers`.*tied"),
           ({"reduction": "median"}, ValueError, "`reduction`"),
           ({"init": "xavier"}, ValueError, "`init`"),
           ({"options": {"n": 1}, "n": 2}, ValueError, "given both")]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            model_randomization(model, batch, method, **kwargs)
    with pytest.raises(ValueError, match="`method`='nope'"):
        model_randomization(model, batch, "nope")
    assert calls == []
    res = model_randomization(model, batch, method, layers="transformer.h.1", options={"seed": 3}, n=1)
    assert calls == [{"seed": 3, "n": 1}] * 2 and res.meta["seed"] == "0"
    assert_unchanged(model, before)


def test_model_restored_when_the_method_fails_inside(gpt2):
    model, tok = gpt2
    batch, before = _batch(model, tok), snapshot(model)
    calls = []

    def method(model, batch, target_fn):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return input_x_gradient(model, batch, target_fn)

    with pytest.raises(KeyboardInterrupt):
        model_randomization(model, batch, method)
    assert_unchanged(model, before)


def test_save_load_round_trip_and_summary(gpt2, tmp_path):
    model, tok = gpt2
    res = model_randomization(model, _batch(model, tok), input_x_gradient)
    path = tmp_path / "sanity.safetensors"
    res.save(path)
    same = load(path)
    for name in ("spearman", "spearman_abs", "steps", "step_mask"):
        a, b = getattr(res, name), getattr(same, name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(torch.uint8) if b.is_floating_point() else b)
    assert (same.stages, same.randomized, same.meta) == (res.stages, res.randomized, res.meta)
    text = res.summary()
    assert "input_x_gradient" in text and "transformer.h.1" in text and "+ transformer.h.0" in text
    assert f"{res.mean()[0]:.3f}" in text
    input_x_gradient(model, _batch(model, tok)).save(tmp_path / "attr.safetensors")
    with pytest.raises(ValueError, match="not an fnattr sanity result"):
        load(tmp_path / "attr.safetensors")

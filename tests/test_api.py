import pytest
import torch

import fnattr
from fnattr.methods import METHODS
from tests.state import assert_unchanged, snapshot


@pytest.mark.parametrize("method", sorted(METHODS))
def test_attribute_runs_every_method_by_name(any_model, method):
    model, tok = any_model
    out = fnattr.attribute(model, tok, ["The capital of France is"], method=method,
                           max_new_tokens=3)
    assert out.meta["method"] == method
    assert out.source.shape[:3] == (1, out.target_ids.shape[1], out.source_ids.shape[1])
    assert torch.isfinite(out.source).all()


def test_attribute_equals_prepare_then_method(gpt2):
    model, tok = gpt2
    one = fnattr.attribute(model, tok, "A dog", " ran in the park", method="integrated_gradients",
                           n_steps=5)
    batch = fnattr.prepare(model, tok, "A dog", " ran in the park")
    two = fnattr.methods.integrated_gradients(model, batch, n_steps=5)
    assert torch.equal(one.source, two.source) and torch.equal(one.delta, two.delta)


def test_unknown_method_is_a_clear_error_and_leaves_model_alone(gpt2):
    model, tok = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError, match="`method`='gradient_magic' is unknown: use one of"):
        fnattr.attribute(model, tok, ["A dog"], method="gradient_magic")
    with pytest.raises(TypeError):
        fnattr.attribute(model, tok, ["A dog"], method="saliency", n_steps=3)  # not a saliency option
    assert_unchanged(model, before)


def test_batch_from_another_model_kind_is_rejected(gpt2, seq2seq_model):
    model, tok = gpt2
    s2s, s2s_tok = seq2seq_model
    batch = fnattr.prepare(s2s, s2s_tok, ["A dog"], [" ran"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="prepared for an encoder-decoder model"):
        fnattr.methods.saliency(model, batch)
    assert_unchanged(model, before)


def test_error_inside_a_method_restores_the_model(gpt2):
    model, tok = gpt2
    batch = fnattr.prepare(model, tok, ["A dog"], [" ran"])
    before = snapshot(model)

    def broken_target(logits, target_ids):
        raise RuntimeError("target failed mid-attribution")

    with pytest.raises(RuntimeError, match="mid-attribution"):
        fnattr.methods.integrated_gradients(model, batch, broken_target)
    assert_unchanged(model, before)


def test_attribute_chat_keywords_and_shared_defaults(gpt2):
    import copy
    import inspect

    from fnattr import defaults, dataset
    from tests.test_batch import CHATML

    model, tok = gpt2
    chat = copy.deepcopy(tok)
    chat.chat_template = CHATML
    out = fnattr.attribute(model, chat, ["The cat sat"], [" on the mat"], method="saliency",
                           chat=True, system="Be brief.")
    batch = fnattr.prepare(model, chat, ["The cat sat"], [" on the mat"], chat=True, system="Be brief.")
    ref = fnattr.methods.saliency(model, batch)
    assert out.source_tokens == batch.source_tokens
    torch.testing.assert_close(out.source, ref.source)
    with pytest.raises(ValueError, match="pass chat=True"):
        fnattr.attribute(model, chat, ["The cat sat"], system="Be brief.")
    # one default number of new tokens in prepare, attribute, dataset runs and the command line
    for fn in (fnattr.prepare, fnattr.attribute, dataset.run):
        assert inspect.signature(fn).parameters["max_new_tokens"].default == defaults.MAX_NEW_TOKENS

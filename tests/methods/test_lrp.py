"""AttnLRP and CP-LRP: the one-pass method equals a plain per-step reference under the same rules
(`tests/methods/lrp_reference.py`, lxt 2.1's forwards rewritten with detach tricks), conserves
where the rules do, and gives a padded row what it gets alone."""

import json

import pytest
import torch

from fnattr import prepare
from fnattr.methods import attnlrp, cp_lrp, input_x_gradient
from fnattr.targets import logit
from fnattr.views import heatmap
from tests.architectures import build
from tests.methods.lrp_reference import reference_rules
from tests.reference import step_gradient
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"
METHODS = {"attnlrp": attnlrp, "cp_lrp": cp_lrp}
DECODERS = ("llama", "qwen2", "qwen3", "gemma3", "gpt2", "gptj")
SEQ2SEQ = ("bart", "t5")
_CACHE: dict = {}


@pytest.fixture(scope="module")
def tiny(decoder_tokenizer, seq2seq_tokenizer):
    def get(name: str):
        tok = seq2seq_tokenizer if name in SEQ2SEQ else decoder_tokenizer
        if name not in _CACHE:
            _CACHE[name] = build(name, len(tok))
        return _CACHE[name], tok
    return get


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("rule", sorted(METHODS))
@pytest.mark.parametrize("name", DECODERS + SEQ2SEQ)
def test_equals_per_step_reference_under_the_same_rules(tiny, name, rule):
    model, tok = tiny(name)
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = METHODS[rule](model, batch, attribute_target=True)
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    plain = input_x_gradient(model, batch, logit, attribute_target=True)
    for k in range(len(tgt)):
        with reference_rules(model, rule):
            s, p, gs, gp = step_gradient(model, src, tgt, k, batch.decoder_start_id, logit)
        want_tgt = (gp * p)[1:] if model.config.is_encoder_decoder else gp * p
        want = torch.cat([gs * s, want_tgt])
        got = torch.cat([out.source[0, k], out.target[0, k, :k]])
        assert _relative(got, want) <= 1e-6, (name, rule, k)
        assert torch.all(out.target[0, k, k:] == 0)
    # the rules change the scores: never silently plain gradients
    assert _relative(out.source, plain.source) > 1e-3


@pytest.mark.parametrize("name", ("llama", "qwen3", "gemma3"))
def test_cp_lrp_conserves_the_logit_on_a_bias_free_model(tiny, name):
    """Bias-free, no learned position embeddings: under CP-LRP every rule is conservative, so the
    relevance of every input adds up to the logit (float32 RMSNorm arithmetic: rel 1e-6)."""
    model, tok = tiny(name)
    out = cp_lrp(model, prepare(model, tok, [SOURCE], [TARGET]), attribute_target=True)
    total = out.source.sum((2, 3)) + out.target.sum((2, 3))
    torch.testing.assert_close(total, out.step_scores["logit"], rtol=1e-6, atol=1e-9)
    rec = json.loads(out.meta["conservation"])
    assert max(abs(v) for v in rec["absorbed_share"][0]) < 1e-5


def test_conservation_record_and_caption(tiny):
    """AttnLRP's softmax rule has a bias term: the record states what it absorbed, consistently
    with the scores, and the caption shows it."""
    model, tok = tiny("llama")
    out = attnlrp(model, prepare(model, tok, [SOURCE, "A dog"], [TARGET, " ran"]), attribute_target=True)
    rec = json.loads(out.meta["conservation"])
    total = out.source.sum((2, 3)) + out.target.sum((2, 3))
    value = out.step_scores["logit"]
    for b in range(2):
        for k in range(out.steps.shape[0]):
            if not out.step_mask[b, k]:
                assert rec["relevance_sum"][b][k] is None
                continue
            assert rec["relevance_sum"][b][k] == pytest.approx(float(total[b, k]), rel=1e-12)
            assert rec["target_value"][b][k] == pytest.approx(float(value[b, k]), rel=1e-12)
            assert rec["absorbed"][b][k] == pytest.approx(float(value[b, k] - total[b, k]), rel=1e-9, abs=1e-15)
            share = (value[b, k] - total[b, k]) / value[b, k]
            assert rec["absorbed_share"][b][k] == pytest.approx(float(share), rel=1e-9)
    assert max(abs(v) for v in rec["absorbed_share"][0]) > 1e-3  # the softmax rule's bias term
    line = [n for n in heatmap(out, row=0).notes if n.startswith("conservation:")]
    assert len(line) == 1 and "logit" in line[0] and "absorbed" in line[0]


@pytest.mark.parametrize("name", ("llama", "gpt2", "bart"))
def test_batch_equals_rows_alone(tiny, name):
    model, tok = tiny(name)
    sources, targets = ["The capital of France is", "A dog"], [" Paris.", " ran in the park today"]
    out = attnlrp(model, prepare(model, tok, sources, targets), attribute_target=True)
    batch = prepare(model, tok, sources, targets)
    for i in range(2):
        one = attnlrp(model, prepare(model, tok, sources[i], targets[i]), attribute_target=True)
        n_tgt, cols = one.target_ids.shape[1], batch.source_mask[i]
        torch.testing.assert_close(out.source[i, :n_tgt][:, cols], one.source[0], rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(out.target[i, :n_tgt, :n_tgt], one.target[0], rtol=1e-7, atol=1e-12)
        assert torch.all(out.source[i, :, ~cols] == 0)


def test_layer_relevance_equals_reference_at_the_block_output(tiny):
    """`layer=` gives the relevance of a block's output: gradient x activation there, per step,
    under the same rules."""
    model, tok = tiny("llama")
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = attnlrp(model, batch, layer="model.layers.0", attribute_target=True)
    assert out.meta["method"] == "attnlrp" and "conservation" in out.meta
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    block = model.model.layers[0]
    for k in range(len(tgt)):
        seen = []

        def leaf(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_()
            seen.append(h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = block.register_forward_hook(leaf)
        try:
            with reference_rules(model, "attnlrp"):
                ids = torch.cat([src, tgt[:k]])[None]
                score = model(input_ids=ids).logits[0, -1, tgt[k]]
                (g,) = torch.autograd.grad(score, seen[0])
        finally:
            handle.remove()
        want = (g * seen[0].detach())[0]
        got = torch.cat([out.source[0, k], out.target[0, k, :k]])
        assert _relative(got, want) <= 1e-6, k


def test_refused_model_names_the_class_and_is_untouched(tiny, decoder_tokenizer):
    model = build("bloom", len(decoder_tokenizer))
    batch = prepare(model, decoder_tokenizer, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises(ValueError, match="BloomForCausalLM") as info:
        attnlrp(model, batch)
    assert "\n" not in str(info.value)
    assert_unchanged(model, before)

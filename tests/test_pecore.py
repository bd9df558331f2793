"""PECoRe (issue 27): CTI against a direct computation of KL / P-CXMI, CCI on a hand-built model
where one context token carries the answer, and the round trip of its result."""

import json
import math

import pytest
import torch

from fnattr.context import describe, pecore
from fnattr.result import load
from tests.one_token_model import one_token_gpt2
from tests.state import assert_unchanged, snapshot

CONTEXT = "Paris is a city. The cat sat."  # "Paris" at the start: the key token
INPUT = "A dog ran"


@pytest.fixture(scope="module")
def answer_model():
    """One-token GPT-2: only the logit of " city" is non-zero (16 / n), and only when "Paris" is
    in the prompt. Without the context every next-token distribution is uniform."""
    from tests.conftest import _tokenizer

    tok = _tokenizer("<s> $A")
    answer = tok(" city", add_special_tokens=False)["input_ids"][0]
    model = one_token_gpt2(len(tok), tok.convert_tokens_to_ids("Paris"))
    with torch.no_grad():
        keep = model.lm_head.weight[answer].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[answer] = keep
    return model, tok


def _direct_logits(model, tok, out):
    """Next-token log-distributions of every target step, with the context (one plain forward)."""
    src = out.source_ids[0, out.source_mask[0]].tolist()
    tgt = out.target_ids[0, out.target_mask[0]].tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([src + tgt])).logits[0, len(src) - 1:-1]
    return logits.double().log_softmax(-1), tgt


@pytest.mark.parametrize("metric", ["kl", "pcxmi"])
def test_cti_equals_a_direct_computation_and_cci_finds_the_cue(answer_model, metric):
    model, tok = answer_model
    before = snapshot(model)
    out = pecore(model, tok, context=CONTEXT, input=INPUT, output=" city city city.",
                 method="occlusion", cti_metric=metric, cti_std=0.5)
    assert_unchanged(model, before)
    logp, tgt = _direct_logits(model, tok, out)
    vocab = logp.shape[-1]
    uniform = -math.log(vocab)  # without the context no logit is non-zero
    if metric == "kl":
        want = (logp.exp() * (logp - uniform)).sum(-1)
    else:
        want = (logp.gather(1, torch.tensor(tgt)[:, None])[:, 0] - uniform) / math.log(2)
    info = json.loads(out.meta["cti"])
    torch.testing.assert_close(torch.tensor(info["scores"][:len(tgt)], dtype=torch.float64), want,
                               rtol=0, atol=1e-9)
    real = want  # no special token in the forced output
    threshold = float(real.mean() + 0.5 * real.std())
    assert info["selected"] == [t for t in range(len(tgt)) if want[t] > threshold]
    assert info["selected"] and out.steps.tolist() == info["selected"]
    cci = json.loads(out.meta["cci"])
    for c in cci:  # occlusion: only replacing "Paris" changes the output
        assert c["top"][0][1] == "Paris" and c["top"][0][0] != 0
        assert all(abs(score) < 1e-9 for score, _ in c["top"][1:])
        # the contextless argmax: a tie broken by ~1e-10 noise; its own token -> contextless input
        assert c["contrast"] == ("source" if c["contrast_token"] == c["token"] else "target")
    paris = out.source_tokens[0].index("Paris")
    assert (out.source[0, :, paris] != 0).all()
    assert "[[" in describe(out) and "'Paris'" in describe(out)


def test_pecore_groups_saliency_and_round_trip(answer_model, tmp_path):
    model, tok = answer_model
    out = pecore(model, tok, context=CONTEXT, input=INPUT, output=" city city city.",
                 groups="sentences", cti_std=0.5)
    assert out.source_tokens == (("Paris is a city.", "The cat sat."),)  # one row per sentence
    plain = pecore(model, tok, context=CONTEXT, input=INPUT, output=" city city city.", cti_std=0.5)
    n_context = len(tok(CONTEXT, add_special_tokens=False)["input_ids"])
    assert (plain.source_groups[0] >= 0).sum() == n_context and plain.group_texts == ((CONTEXT,),)
    grouped = plain.grouped()  # saliency: the L2 norm over the context's tokens
    context = plain.source_groups[0] >= 0
    torch.testing.assert_close(grouped.source[0, :, 0], plain.source[0][:, context].norm(dim=-1),
                               rtol=1e-12, atol=0)
    # the sentences leave out the space between them: their norm is at most the context's
    assert (out.source[0].norm(dim=-1) <= grouped.source[0, :, 0] + 1e-12).all()
    tops = [c["top"] for c in json.loads(out.meta["cci"])]
    assert tops and all(t[0][1] == "Paris is a city." for t in tops)  # saliency, by sentence
    path = tmp_path / "p.safetensors"
    out.save(path)
    back = load(path)
    assert torch.equal(back.source, out.source) and back.meta == out.meta
    assert back.source_tokens == out.source_tokens and describe(back) == describe(out)
    with pytest.raises((ValueError, TypeError), match="cti_metric"):  # TypeError: jaxtyping hook
        pecore(model, tok, context=CONTEXT, input=INPUT, cti_metric="js")


def test_pecore_chat_renders_both_prompts_with_the_template(answer_model):
    import copy

    model, tok = answer_model
    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                          "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    out = pecore(model, chat, context=CONTEXT, input=INPUT, output=" city city city.",
                 method="occlusion", cti_std=0.5, chat=True)
    assert "".join(out.source_tokens[0]).startswith("<s>user\n" + CONTEXT)
    assert out.group_texts == ((CONTEXT,),)
    cci = json.loads(out.meta["cci"])
    assert cci and all(c["top"][0][1] == "Paris" for c in cci)

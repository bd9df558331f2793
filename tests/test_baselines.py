"""`baseline="auto"`: a neutral baseline per tokenizer, recorded in every method's meta."""

import dataclasses
import inspect
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from fnattr import prepare
from fnattr.baselines import resolve_baseline
from fnattr.methods import METHODS, deeplift, integrated_gradients, occlusion
from fnattr.targets import probability

WORDS = ["The", "capital", "of", "France", "is", "Paris", "."]
CHATML = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
# name: (special tokens (ids 0, 1, ...), tokenizer arguments, expected kind, its token or None)
CASES = {
    "unk distinct and ordinary": (
        ["<pad>", "<s>", "</s>", "<unk>"],
        {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "unk", "<unk>"),
    "pad = an ordinary unk (Llama with pad_token = unk_token)": (
        ["<unk>", "<s>", "</s>"],
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"},
        "unk", "<unk>"),
    "GPT-2 style: unk = bos = eos, distinct pad": (
        ["<|endoftext|>", "<pad>"],
        {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<pad>"},
        "pad", "<pad>"),
    "GPT-2 style: unk = bos = eos, no pad": (
        ["<|endoftext|>"],
        {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
        "zeros", None),
    "unk among the additional special tokens": (
        ["<pad>", "<unk>", "</s>"],
        {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>",
         "additional_special_tokens": ["<unk>"]},
        "pad", "<pad>"),
    "unk written by the chat template": (
        ["<pad>", "<unk>", "</s>"],
        {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>",
         "chat_template": "{% for m in messages %}<unk>{{ m['content'] }}{% endfor %}"},
        "pad", "<pad>"),
    "no unk, pad distinct": (
        ["<pad>", "</s>"], {"pad_token": "<pad>", "eos_token": "</s>"}, "pad", "<pad>"),
    "nothing: no unk, no pad": (["</s>"], {"eos_token": "</s>"}, "zeros", None),
    "SmolLM2 style: unk <|endoftext|>, pad = eos <|im_end|>": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"unk_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "pad_token": "<|im_end|>", "chat_template": CHATML},
        "zeros", None),
}


def tiny(specials: list[str], named: dict) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A word-level tokenizer with `specials` first, and a tiny float64 GPT2 whose config names
    the same bos/eos/pad ids."""
    named = dict(named)
    template = named.pop("chat_template", None)
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token=named.get("unk_token")))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **named)
    tok.chat_template = template
    torch.manual_seed(0)
    ids = {f"{role}_token_id": getattr(tok, f"{role}_token_id") for role in ("bos", "eos", "pad")}
    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=2, n_head=2, **ids)
    return GPT2LMHeadModel(config).to(torch.float64).eval(), tok


def tiny_batch(case: str, **kwargs):
    specials, named, *_ = CASES[case]
    model, tok = tiny(specials, named)
    return model, tok, prepare(model, tok, "The capital of France is", " Paris .", **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_auto_falls_back_in_the_documented_order(case):
    _, _, kind, token = CASES[case]
    _, tok, batch = tiny_batch(case)
    got_kind, got_id, text = resolve_baseline(batch, "auto")
    assert (got_kind, got_id) == (kind, None if token is None else tok.convert_tokens_to_ids(token))
    if token is not None:
        assert text.startswith(f"{kind} token {token!r} (id {got_id})")
    else:
        assert text.startswith("zero vector (")
    # what was rejected is named, with why
    if tok.unk_token is not None and kind != "unk":
        assert f"unk {tok.unk_token!r}" in text
    if kind == "zeros":
        assert "pad" in text


def test_descriptions_name_the_tokens_and_why():
    _, _, batch = tiny_batch("SmolLM2 style: unk <|endoftext|>, pad = eos <|im_end|>")
    assert resolve_baseline(batch, "auto")[2] == (
        "zero vector (unk '<|endoftext|>' (id 0) is a <|...|> control token; "
        "pad '<|im_end|>' (id 2) is the EOS token and a chat-template token)")
    _, _, batch = tiny_batch("GPT-2 style: unk = bos = eos, no pad")
    assert resolve_baseline(batch, "auto")[2] == (
        "zero vector (unk '<|endoftext|>' (id 0) is the BOS token and the EOS token; no pad token)")


def test_explicit_choices_are_taken_as_given():
    _, tok, batch = tiny_batch("GPT-2 style: unk = bos = eos, distinct pad")
    assert resolve_baseline(batch, "unk")[:2] == ("unk", 0)
    assert "which is the BOS token and the EOS token" in resolve_baseline(batch, "unk")[2]
    assert resolve_baseline(batch, "pad")[:2] == ("pad", tok.pad_token_id)
    assert resolve_baseline(batch, "zeros") == ("zeros", None, "zero vector")
    assert resolve_baseline(batch, torch.zeros(1, 5, 16))[:2] == ("tensor", None)
    _, tok, batch = tiny_batch("nothing: no unk, no pad")
    assert resolve_baseline(batch, "unk")[:2] == ("pad", batch.pad_id)  # as before: pad
    with pytest.raises(ValueError, match="'auto', 'unk', 'pad', 'zeros' or a tensor"):
        resolve_baseline(batch, "noise")


def test_explicit_separator_warns_and_still_works():
    model, _, batch = tiny_batch("GPT-2 style: unk = bos = eos, distinct pad")
    with pytest.warns(UserWarning, match=r"'<\|endoftext\|>'.*baseline='auto' uses the pad token"):
        out = occlusion(model, batch, baseline="unk")
    assert out.meta["baseline_kind"] == "unk"
    model, _, batch = tiny_batch("unk distinct and ordinary")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        occlusion(model, batch, baseline="unk")


def test_batch_keeps_the_special_token_table():
    _, _, batch = tiny_batch("SmolLM2 style: unk <|endoftext|>, pad = eos <|im_end|>")
    assert ("chat", 1, "<|im_start|>") in batch.special_tokens
    assert batch.select([0]).special_tokens == batch.special_tokens
    assert batch.to("cpu").special_tokens == batch.special_tokens
    # a Batch built without the table (older code) gets the old default, unk
    old = dataclasses.replace(batch, special_tokens=())
    assert resolve_baseline(old, "auto")[:2] == ("unk", 0)


def _with_baseline():
    names = [n for n, fn in METHODS.items() if "baseline" in inspect.signature(fn).parameters]
    assert {"integrated_gradients", "deeplift", "layer_deeplift", "gradient_shap", "occlusion",
            "lime", "discretized_integrated_gradients", "layer_integrated_gradients"} <= set(names)
    return names


FAST = {"n_steps": 2, "points_per_segment": 1, "n_samples": 4, "seed": 0}


@pytest.mark.parametrize("name", _with_baseline())
@pytest.mark.parametrize("case", ["unk distinct and ordinary", "GPT-2 style: unk = bos = eos, no pad"])
def test_every_method_records_the_baseline_it_used(name, case):
    model, _, batch = tiny_batch(case)
    fn = METHODS[name]
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in FAST.items() if k in params}
    with warnings.catch_warnings():
        # the default ("auto") never warns about a separator (DeepLIFT's and DIG's "auto" may
        # take one where the zero vector is singular for them, and says so in meta)
        warnings.filterwarnings("error", message="`baseline`=")
        out = fn(model, batch, **kwargs)
        kind, _, text = resolve_baseline(batch, params["baseline"].default, name)
        assert (out.meta["baseline_kind"], out.meta["baseline"]) == (kind, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an explicit pad that is a separator warns
        out = fn(model, batch, baseline="pad", **kwargs)
    assert out.meta["baseline_kind"] == "pad" and out.meta["baseline"].startswith("pad ")


def test_default_is_auto():
    for name in _with_baseline():
        assert inspect.signature(METHODS[name]).parameters["baseline"].default == "auto", name


def test_sequences_and_tensors_are_described():
    model, _, batch = tiny_batch("GPT-2 style: unk = bos = eos, distinct pad")
    out = METHODS["gradient_shap"](model, batch, n_samples=2, seed=0, baseline=("auto", "zeros"))
    assert out.meta["baseline_kind"] == "pad,zeros"
    assert out.meta["baseline"] == "pad token '<pad>' (id 1), since unk '<|endoftext|>' (id 0) is " \
        "the BOS token and the EOS token | zero vector"
    given = torch.zeros(1, 5, 16, dtype=torch.float64)
    out = integrated_gradients(model, batch, n_steps=2, baseline=given)
    assert out.meta["baseline_kind"] == "tensor"
    assert out.meta["baseline"].startswith("caller's tensor [1, 5, 16] (source side); target side: pad")


def _f_at(model, batch, fill):
    """Every step's probability when each ordinary token reads `fill` (special tokens kept)."""
    ids = torch.cat([batch.source_ids, batch.target_ids], 1)
    special = torch.cat([batch.source_special, batch.target_special], 1)
    emb = model.get_input_embeddings()(ids)
    with torch.no_grad():
        logits = model(inputs_embeds=torch.where(special[..., None], emb, fill)).logits
    n = batch.source_ids.shape[1]
    steps = logits[0, n - 1:-1].softmax(-1)
    return steps.gather(-1, batch.target_ids[0][:, None])[:, 0]


@pytest.mark.parametrize("case", CASES)
def test_scores_complete_to_the_expected_baseline(case):
    """DeepLIFT sums exactly, and IG nearly, to f(x) - f(baseline), with the baseline built here
    from the expected token's embedding (or zeros); the other candidates are far off."""
    model, tok, batch = tiny_batch(case)
    kind, token = CASES[case][2:]
    table = model.get_input_embeddings().weight.detach()
    fills = {"zeros": torch.zeros(16, dtype=torch.float64)}
    for role in ("unk", "pad"):
        if getattr(tok, f"{role}_token_id") is not None:
            fills[role] = table[getattr(tok, f"{role}_token_id")]
    assert torch.equal(fills[kind], torch.zeros(16, dtype=torch.float64) if token is None
                       else table[tok.convert_tokens_to_ids(token)])
    f_x = _f_at(model, batch, table[torch.cat([batch.source_ids, batch.target_ids], 1)])
    gap = {k: f_x - _f_at(model, batch, v) for k, v in fills.items()}
    dl = deeplift(model, batch)
    ig = integrated_gradients(model, batch, n_steps=64)
    # DeepLIFT's "auto" takes the UNK (else pad) token where the zero vector is singular for it
    dl_kind = resolve_baseline(batch, "auto", "deeplift")[0]
    assert dl_kind == kind or (kind == "zeros" and dl_kind in ("unk", "pad"))
    for out, k, tol in ((dl, dl_kind, 1e-10), (ig, kind, 1e-5)):
        total = out.source[0].sum((-2, -1)) + out.target[0].sum((-2, -1))
        torch.testing.assert_close(total, gap[k], rtol=0, atol=tol)
        for other, want in gap.items():
            if not torch.allclose(want, gap[k], atol=100 * tol):
                assert not torch.allclose(total, want, atol=10 * tol), other


@pytest.mark.parametrize("case", CASES)
def test_occlusion_auto_equals_the_resolved_explicit_baseline(case):
    model, _, batch = tiny_batch(case)
    auto = occlusion(model, batch, probability)
    kind = resolve_baseline(batch, "auto")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit = occlusion(model, batch, probability, baseline=kind)
    assert torch.equal(auto.source, explicit.source) and torch.equal(auto.target, explicit.target)
    assert auto.meta["baseline_kind"] == kind
    assert (auto.source != 0).any()

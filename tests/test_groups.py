"""Feature groups (issue 27): splitters, prepare(groups=...), results reduced to groups, views,
save/load, and whole-group perturbation in occlusion and LIME."""

import copy
import dataclasses

import pytest
import torch

import fnattr
from fnattr import groups as G
from fnattr import render, views
from fnattr.batch import prepare
from fnattr.methods import integrated_gradients, lime, occlusion, saliency
from fnattr.result import load
from tests.one_token_model import one_token_gpt2
from tests.state import assert_unchanged, snapshot

TEXTS = ["The cat sat. The dog ran.\n\nParis is a city.", "A dog ran in the park."]
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _spans(text: str, spans) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_splitters_cut_where_people_read():
    text = "The cat sat. The dog ran!\nParis is a city?\n\n  Rome too.  "
    assert _spans(text, G.words(text))[:4] == ["The", "cat", "sat.", "The"]
    assert _spans(text, G.sentences(text)) == ["The cat sat.", "The dog ran!", "Paris is a city?",
                                              "Rome too."]
    assert _spans(text, G.lines(text)) == ["The cat sat. The dog ran!", "Paris is a city?", "Rome too."]
    assert _spans(text, G.documents()(text)) == ["The cat sat. The dog ran!\nParis is a city?",
                                                 "Rome too."]
    assert _spans(text, G.documents("ran!")(text))[0] == "The cat sat. The dog"
    assert G.splitter("documents").__name__ == "documents" and G.kind([[(0, 1)]]) == "spans"
    with pytest.raises(ValueError, match="unknown"):
        G.splitter("paragraphs")
    with pytest.raises(ValueError, match="separator"):
        G.documents("")


@pytest.fixture(scope="module")
def llama(request):
    from tests.conftest import _build, _tokenizer

    tok = _tokenizer("<s> $A")
    return _build("llama", len(tok)), tok


@pytest.fixture(scope="module")
def grouped_batch(llama):
    model, tok = llama
    return prepare(model, tok, TEXTS, max_new_tokens=3, groups="sentences")


def _members(batch, b, g):
    return (batch.source_groups[b] == g).nonzero().squeeze(1).tolist()


def test_prepare_places_every_token_in_one_group_or_none(grouped_batch):
    batch = grouped_batch
    assert batch.group_by == "sentences"
    assert batch.source_group_texts == (("The cat sat.", "The dog ran.", "Paris is a city."),
                                        ("A dog ran in the park.",))
    for b in range(len(batch)):
        groups = batch.source_groups[b]
        assert (groups[~batch.source_mask[b]] == -1).all()  # padding in no group
        bos = batch.source_tokens[b].index("<s>")
        assert groups[bos] == -1  # the added BOS in no group
        for g, text in enumerate(batch.source_group_texts[b]):
            members = _members(batch, b, g)
            assert members == list(range(members[0], members[-1] + 1))  # contiguous
            assert "".join(batch.source_tokens[b][i] for i in members).strip() == text
    # the space and newlines between sentences, tokens of their own, are in no group
    row = batch.source_tokens[0]
    assert all(batch.source_groups[0][i] == -1 for i, t in enumerate(row) if t.isspace())


def test_spans_and_errors(llama):
    model, tok = llama
    text = TEXTS[1]
    batch = prepare(model, tok, [text], [" ok"], groups=[[(0, 5), (6, len(text))]])
    assert batch.group_by == "spans" and batch.source_group_texts == (("A dog", "ran in the park."),)
    # a span that cuts a token takes the whole token: groups never split a token
    cut = prepare(model, tok, [text], [" ok"], groups=[[(0, 3), (4, 9)]])
    assert cut.source_group_texts[0][0] == "A dog"
    for spans, match in (([[(0, 5), (3, 9)]], "overlap"), ([[(0, 99)]], "0 <= start"),
                         ([[(0, 5)], [(0, 5)]], "1 sources"), ([[(0, 3), (3, 4)]], "no token")):
        with pytest.raises(ValueError, match=match):
            prepare(model, tok, [text], [" ok"], groups=spans)
    with pytest.raises(ValueError, match="chat=True"):
        prepare(model, tok, [text], [" ok"], groups="messages")


def test_messages_are_the_chat_turns(llama):
    model, tok = llama
    chat = copy.deepcopy(tok)
    chat.chat_template = CHATML
    batch = prepare(model, chat, ["Where is Paris?"], [" France"], chat=True, system="Be brief.",
                    groups="messages")
    assert batch.source_group_texts == (("Be brief.", "Where is Paris?"),)
    template_only = batch.source_template[0] & (batch.source_groups[0] == -1)
    assert template_only.sum() > 4  # role headers and markers in no group
    user = _members(batch, 0, 1)
    assert not batch.source_template[0, user].any()
    words = prepare(model, chat, ["Where is Paris?"], [" France"], chat=True, groups="words")
    assert words.source_group_texts == (("Where", "is", "Paris?"),)  # the user's text only


def test_select_and_to_keep_groups(grouped_batch):
    one = grouped_batch.select([1])
    assert one.source_group_texts == grouped_batch.source_group_texts[1:]
    cols = grouped_batch.source_mask[1]
    assert torch.equal(one.source_groups[0], grouped_batch.source_groups[1][cols])


def test_grouped_sums_additive_scores_and_takes_the_norm_of_gradients(llama, grouped_batch):
    model, _ = llama
    ig = integrated_gradients(model, grouped_batch, n_steps=4)
    sal = saliency(model, grouped_batch)
    for out, how in ((ig, "sum"), (sal, "l2")):
        assert out.group_texts == grouped_batch.source_group_texts
        tokens = views.view(out).source  # hidden reduced by the method's own reduction
        g = out.grouped()
        assert g.meta["grouped"] == how and g.extra_dims == ()
        assert g.source_tokens[1] == ("A dog ran in the park.", "", "")
        for b in range(2):
            for k, text in enumerate(out.group_texts[b]):
                part = tokens[b][:, _members(grouped_batch, b, k)]
                want = part.sum(-1) if how == "sum" else part.norm(dim=-1)
                torch.testing.assert_close(g.source[b][:, k], want, rtol=1e-12, atol=1e-15)
            assert (g.source[b][:, len(out.group_texts[b]):] == 0).all()
        assert torch.equal(g.target, views.view(out).target)  # target side as it was
        assert g.grouped() is g
    # post-hoc grouping of a result without groups, from its token texts
    plain = dataclasses.replace(grouped_batch, source_groups=None, source_group_texts=None, group_by=None)
    post = integrated_gradients(model, plain, n_steps=4).grouped("sentences")
    torch.testing.assert_close(post.source, ig.grouped().source, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="no groups"):
        integrated_gradients(model, plain, n_steps=4).grouped()


def test_groups_round_trip_bit_exact(tmp_path, llama, grouped_batch):
    model, _ = llama
    out = saliency(model, grouped_batch)
    for i, res in enumerate((out, out.grouped())):
        path = tmp_path / f"r{i}.safetensors"
        res.save(path)
        back = load(path)
        for name in ("source", "source_ids", "source_mask", "target"):
            assert torch.equal(getattr(back, name), getattr(res, name))
        assert back.source_tokens == res.source_tokens and back.meta == res.meta
        assert back.group_texts == res.group_texts
        assert (back.source_groups is None) == (res.source_groups is None)
        if res.source_groups is not None:
            assert torch.equal(back.source_groups, res.source_groups)
    assert torch.equal(load(tmp_path / "r0.safetensors").grouped().source, out.grouped().source)


def test_views_draw_groups_as_rows(llama, grouped_batch, capsys):
    model, _ = llama
    out = occlusion(model, grouped_batch)  # already grouped
    hm = views.heatmap(out)
    assert hm.rows[:3] == ("The cat sat.", "The dog ran.", "Paris is a city.")
    ig = integrated_gradients(model, grouped_batch, n_steps=4)
    hm = views.heatmap(ig, group_by=True)
    assert hm.rows[:3] == ("The cat sat.", "The dog ran.", "Paris is a city.")
    assert views.heatmap(ig, group_by="sentences").rows == hm.rows  # its own groups by name
    assert views.heatmap(ig, group_by="words").rows[:2] == ("<s>The", "cat")  # post hoc
    render.console(ig, group_by=True)
    assert "Paris is a city." in capsys.readouterr().out
    assert "Paris is a city." in render.html(ig, group_by=True)


def _token_spans(tok, texts):
    return [[tuple(o) for o in tok(t, add_special_tokens=False, return_offsets_mapping=True)
             ["offset_mapping"]] for t in texts]


def _without_groups(batch):
    return dataclasses.replace(batch, source_groups=None, source_group_texts=None, group_by=None)


@pytest.mark.parametrize("method", ["occlusion", "lime"])
def test_one_token_groups_equal_token_perturbation(llama, method):
    model, tok = llama
    batch = prepare(model, tok, TEXTS, max_new_tokens=3, groups=_token_spans(tok, TEXTS))
    run = (lambda b: occlusion(model, b)) if method == "occlusion" else (
        lambda b: lime(model, b, n_samples=24, seed=3))
    by_group, by_token = run(batch), run(_without_groups(batch))
    for b in range(len(batch)):
        cols = (batch.source_groups[b] >= 0).nonzero().squeeze(1)
        assert torch.equal(by_group.source[b][:, :len(cols)], by_token.source[b][:, cols])
    assert torch.equal(by_group.target, by_token.target)


def test_group_occlusion_runs_one_copy_per_group(llama, grouped_batch):
    model, _ = llama
    rows = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((kwargs.get("inputs_embeds") if kwargs.get(
            "inputs_embeds") is not None else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    try:
        occlusion(model, grouped_batch.select([0]), attribute_target=False, internal_batch_size=64)
    finally:
        handle.remove()
    assert sum(rows) - rows[0] == 3  # the clean forward, then one copy per sentence


@pytest.mark.parametrize("method", ["occlusion", "lime"])
def test_grouped_batch_equals_rows_alone(llama, grouped_batch, method):
    model, _ = llama
    run = (lambda b: occlusion(model, b)) if method == "occlusion" else (
        lambda b: lime(model, b, n_samples=16, seed=0))
    both = run(grouped_batch)
    for r in range(2):
        alone = run(grouped_batch.select([r]))
        n = len(grouped_batch.source_group_texts[r])
        torch.testing.assert_close(both.source[r][:, :n], alone.source[0][:, :n], rtol=1e-9, atol=1e-12)
        assert both.source_tokens[r][:n] == alone.source_tokens[0][:n]


def test_the_group_with_the_key_token_takes_all_the_occlusion(llama):
    _, tok = llama
    key = tok.convert_tokens_to_ids("Paris")
    model = one_token_gpt2(len(tok), key)
    batch = prepare(model, tok, ["The cat sat. The dog ran.\n\nParis is a city."], [" A dog"],
                    groups="documents")
    before = snapshot(model)
    out = occlusion(model, batch, fnattr.targets.logit, attribute_target=False)
    assert out.source_tokens[0] == ("The cat sat. The dog ran.", "Paris is a city.")
    assert out.source[0, :, 0].abs().max() < 1e-8  # the key's document: all of f(x) - 0
    torch.testing.assert_close(out.source[0, :, 1], out.step_scores["logit"][0], rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="hidden_window"):
        occlusion(model, batch, hidden_window=4)
    assert_unchanged(model, before)


def test_merge_drops_groups(llama, grouped_batch):
    model, _ = llama
    out = occlusion(model, _without_groups(grouped_batch))
    ig = integrated_gradients(model, grouped_batch, n_steps=4)
    merged = fnattr.aggregate.merge_regex(views.view(ig))
    assert merged.source_groups is None and merged.group_texts is None
    assert out.source_groups is None


def test_attribute_passes_groups_and_occlusion_returns_them(llama):
    model, tok = llama
    out = fnattr.attribute(model, tok, TEXTS[0], method="occlusion", groups="sentences",
                           max_new_tokens=2)
    assert out.source_tokens == (("The cat sat.", "The dog ran.", "Paris is a city."),)
    assert out.meta["group_by"] == "sentences" and out.grouped() is out
    with pytest.raises(ValueError, match="unknown"):
        fnattr.attribute(model, tok, TEXTS[0], method="occlusion", groups="paragraphs")


def test_faithfulness_by_groups_equals_tokens_when_every_group_is_one_token(llama):
    from fnattr.evaluate import faithfulness

    model, tok = llama
    batch = prepare(model, tok, TEXTS[:1], max_new_tokens=2, groups=_token_spans(tok, TEXTS[:1]))
    plain = _without_groups(batch)
    opts = dict(fractions=(0.2, 0.5), curve_levels=3, n_random=2, seed=1)
    by_group = faithfulness(model, batch, occlusion(model, batch), **opts)
    by_token = faithfulness(model, plain, occlusion(model, plain), **opts)
    for name in ("comprehensiveness", "sufficiency", "deletion", "insertion"):  # (random draws
        # are drawn over the positions, groups here, so they differ)
        torch.testing.assert_close(getattr(by_group, name), getattr(by_token, name), rtol=1e-12, atol=1e-14)
    sentences = prepare(model, tok, TEXTS[:1], max_new_tokens=2, groups="sentences")
    faith = faithfulness(model, sentences, integrated_gradients(model, sentences, n_steps=4), **opts)
    # three sentences, and the earlier generated tokens (IG scores the target side too)
    assert faith.removable[0].tolist() == [3 + k for k in range(faith.removable.shape[1])]
    with pytest.raises(ValueError, match="mask"):
        faithfulness(model, sentences, occlusion(model, sentences), removal="mask")

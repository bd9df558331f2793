"""Aggregations against hand-computed small tensors; subword merging on two tokenizer families."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fnattr import aggregate as A
from fnattr.result import AttributionTensors

CORPUS = ["The capital of France is Paris.", "The cat sat on the mat.", "A dog ran in the park.",
          "Rome is a city in Italy.", "The quick brown fox jumps over the lazy dog."] * 4
TEXT = "The capital of Byzantium was Constantinople."


def result(source, target=None, *, steps=None, extra=(), ids=None, tokens=None, masks=None,
           step_scores=None):
    b, n_steps, s = source.shape[:3]
    t = n_steps if target is None else target.shape[2]
    src_ids, tgt_ids = ids if ids is not None else (torch.arange(b * s).view(b, s), torch.arange(b * t).view(b, t))
    src_tok, tgt_tok = tokens if tokens is not None else (
        tuple(tuple(f"s{i}" for i in range(s)) for _ in range(b)),
        tuple(tuple(f"t{j}" for j in range(t)) for _ in range(b)))
    src_mask, tgt_mask = masks if masks is not None else (torch.ones(b, s, dtype=torch.bool),
                                                          torch.ones(b, t, dtype=torch.bool))
    return AttributionTensors(
        source=source.double(), target=None if target is None else target.double(),
        steps=torch.arange(n_steps) if steps is None else steps,
        step_scores=step_scores or {"probability": torch.arange(b * n_steps).view(b, n_steps).double()},
        source_ids=src_ids, target_ids=tgt_ids, source_mask=src_mask, target_mask=tgt_mask,
        source_tokens=src_tok, target_tokens=tgt_tok, extra_dims=extra, meta={"method": "test"})


@pytest.fixture
def hand():
    source = torch.tensor([[[[1, 2], [-3, 0.5], [0, 4]], [[2, -1], [1, 1], [-2, 2]]]])
    target = torch.tensor([[[[0.0, 0], [0, 0]], [[3, -4], [0, 0]]]])
    return result(source, target, extra=("hidden",))


@pytest.mark.parametrize("how, src, tgt", [
    ("sum", [[3, -2.5, 4], [1, 2, 0]], [[0, 0], [-1, 0]]),
    ("mean", [[1.5, -1.25, 2], [0.5, 1, 0]], [[0, 0], [-0.5, 0]]),
    ("l2", [[math.sqrt(5), math.sqrt(9.25), 4], [math.sqrt(5), math.sqrt(2), math.sqrt(8)]], [[0, 0], [5, 0]]),
    ("max", [[2, 0.5, 4], [2, 1, 2]], [[0, 0], [3, 0]]),
    ("absmax", [[2, -3, 4], [2, 1, -2]], [[0, 0], [-4, 0]]),
])
def test_reduce_by_hand(hand, how, src, tgt):
    out = A.reduce(hand, how)
    assert out.extra_dims == ()
    torch.testing.assert_close(out.source[0], torch.tensor(src, dtype=torch.float64))
    torch.testing.assert_close(out.target[0], torch.tensor(tgt, dtype=torch.float64))


def test_reduce_callable_and_unknown(hand):
    out = A.reduce(hand, lambda t, d: t.amin(d))
    torch.testing.assert_close(out.source[0, 0], torch.tensor([1, -3, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not a reduction"):
        A.reduce(hand, "median")


def test_multi_dim_reductions_in_any_order():
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 3, 4, 2, 5), torch.randn(2, 3, 3, 2, 5)
    out = result(src, tgt, extra=("layer", "head"))
    a = A.reduce(A.reduce(out, "sum", ["head"]), "max", ["layer"])
    torch.testing.assert_close(a.source, src.double().sum(-1).amax(-1))
    b = A.reduce(A.reduce(out, "max", ["layer"]), "sum", ["head"])
    torch.testing.assert_close(b.source, src.double().amax(3).sum(-1))
    assert not torch.allclose(a.source, b.source)  # the order matters, and is honoured
    both = [A.reduce(out, "sum", d).source for d in (["head", "layer"], ["layer", "head"])]
    torch.testing.assert_close(both[0], src.double().sum((-1, -2)))
    torch.testing.assert_close(both[1], both[0])
    # merging tokens commutes with summing the extra dims
    groups = [[[0, 1], [2, 3]]] * 2
    merged_first = A.reduce(A.merge(out, source=groups), "sum")
    reduced_first = A.merge(A.reduce(out, "sum"), source=groups)
    torch.testing.assert_close(merged_first.source, reduced_first.source)
    torch.testing.assert_close(merged_first.target, reduced_first.target)


def test_normalize_and_rescale_by_hand(hand):
    out = A.reduce(hand, "sum")
    norm = A.normalize(out)
    torch.testing.assert_close(norm.source[0], torch.tensor([[3 / 9.5, -2.5 / 9.5, 4 / 9.5], [0.25, 0.5, 0]],
                                                            dtype=torch.float64))
    torch.testing.assert_close(norm.target[0, 1], torch.tensor([-0.25, 0], dtype=torch.float64))
    scaled = A.rescale(out)
    torch.testing.assert_close(scaled.source[0], torch.tensor([[0.75, -0.625, 1], [0.5, 1, 0]],
                                                              dtype=torch.float64))
    torch.testing.assert_close(scaled.target[0, 1], torch.tensor([-0.5, 0], dtype=torch.float64))
    zero = A.normalize(out.replace(source=torch.zeros_like(out.source), target=torch.zeros_like(out.target)))
    assert zero.source.abs().sum() == 0 and not zero.source.isnan().any()


def test_merge_by_hand(hand):
    out = A.merge(A.reduce(hand, "sum"), source=[[[0, 1], [2]]])
    torch.testing.assert_close(out.source[0], torch.tensor([[0.5, 4], [3, 0]], dtype=torch.float64))
    assert out.source_tokens == (("s0s1", "s2"),)
    assert out.source_ids.tolist() == [[0, 2]]
    # target tokens merged into one word: one step, the mean of the two; no earlier word to score
    one = A.merge(A.reduce(hand, "sum"), source=[[[0, 1], [2]]], target=[[[0, 1]]])
    assert one.steps.tolist() == [0]
    torch.testing.assert_close(one.source[0], torch.tensor([[1.75, 2]], dtype=torch.float64))
    assert one.target.abs().sum() == 0
    torch.testing.assert_close(one.step_scores["probability"], torch.tensor([[0.5]], dtype=torch.float64))


def test_merge_target_words_and_steps():
    torch.manual_seed(1)
    src = torch.randn(1, 3, 2)
    tgt = torch.randn(1, 3, 3).tril(-1)  # target j scores step k only for j < k
    out = A.merge(result(src, tgt), target=[[[0], [1, 2]]], how="sum", steps_how="mean")
    assert out.steps.tolist() == [0, 1] and out.target_tokens == (("t0", "t1t2"),)
    s, t = src.double()[0], tgt.double()[0]
    torch.testing.assert_close(out.source[0], torch.stack([s[0], (s[1] + s[2]) / 2]))
    expected = torch.tensor([[0, 0], [(t[1, 0] + t[2, 0]) / 2, 0]], dtype=torch.float64)
    torch.testing.assert_close(out.target[0], expected)  # the word "t1t2" never scores itself


def test_merge_rejects_bad_groups(hand):
    with pytest.raises(ValueError, match="each position once"):
        A.merge(hand, source=[[[0, 1], [1, 2]]])


def test_spans_and_regex_with_padding():
    src = torch.arange(2 * 1 * 4, dtype=torch.float64).view(2, 1, 4)
    mask = torch.tensor([[True] * 4, [False, True, True, True]])  # row 1 left padded
    tokens = (("The", " cap", "ital", " city"), ("<pad>", "A", " do", "g"))
    out = result(src, torch.zeros(2, 1, 1), tokens=(tokens, (("x",), ("y",))),
                 masks=(mask, torch.ones(2, 1, dtype=torch.bool)))
    words = A.merge_regex(out, r"\S+")
    assert words.source_tokens == (("The", " capital", " city"), ("A", " dog", ""))
    assert words.source_mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(words.source[:, 0], torch.tensor([[0, 3, 3], [5, 13, 0]], dtype=torch.float64))
    spans = A.merge_spans(out, source=[(1, 3)])  # real positions: row 1 starts after its padding
    torch.testing.assert_close(spans.source[:, 0], torch.tensor([[0, 3, 3], [5, 13, 0]], dtype=torch.float64))
    assert A.span_groups(4, [(0, 2)]) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="overlaps"):
        A.span_groups(4, [(0, 2), (1, 3)])
    assert A.regex_groups(["The", " cap", "ital", ".", " Next"], r"[^.]+\.?") == [[0, 1, 2, 3], [4]]


def test_difference(hand):
    other = hand.replace(source=hand.source * 3, target=hand.target * 3)
    diff = A.difference(other, hand)
    torch.testing.assert_close(diff.source, 2 * hand.source)
    torch.testing.assert_close(diff.step_scores["probability"], torch.zeros(1, 2, dtype=torch.float64))
    renamed = hand.replace(source_tokens=(("s0", "X", "s2"),))
    with pytest.raises(ValueError, match="'s1'.*'X'|source_tokens"):
        A.difference(hand, renamed)


# ---- subword merging on the two tokenizer families ------------------------------------------

def _train(kind: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + [TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def family(request):
    return request.param, _train(request.param)


def test_merge_words_both_families(family):
    kind, tok = family
    assert A.word_scheme(tok) == kind
    src = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    tgt = tok(" Rome is old", add_special_tokens=False)["input_ids"]
    assert len(src) > len(TEXT.split()) + 2  # some words really are split into subwords
    s, t = len(src), len(tgt)
    src_scores = (2.0 ** torch.arange(s)).expand(1, t, s)
    tgt_scores = (2.0 ** torch.arange(t)).expand(1, t, t).tril(-1)
    out = result(src_scores.clone(), tgt_scores.clone(),
                 ids=(torch.tensor([src]), torch.tensor([tgt])),
                 tokens=((tuple(tok.decode([i]) for i in src),), (tuple(tok.decode([i]) for i in tgt),)))
    words = A.merge_words(out, tok)
    labels = [w.strip() for w in words.source_tokens[0]]
    assert labels == ["<s>"] + TEXT.split()  # the special token is a word of its own
    assert [w.strip() for w in words.target_tokens[0]] == ["Rome", "is", "old"]
    # each word's score is the sum over exactly its tokens: 2**i identifies them
    raw = tok.convert_ids_to_tokens(src)
    groups = A.word_groups(raw, kind, [i == tok.bos_token_id for i in src])
    assert [sorted(g) for g in groups] == [g for g in groups] and sum(map(len, groups)) == s
    expected = torch.tensor([sum(2.0 ** i for i in g) for g in groups], dtype=torch.float64)
    torch.testing.assert_close(words.source[0, 0], expected)
    tg = A.word_groups(tok.convert_ids_to_tokens(tgt), kind)
    word_sum = [sum(2.0 ** j for j in g) for g in tg]  # earlier words are seen whole by every step
    assert words.target[0].tolist() == [[word_sum[j] if j < k else 0 for j in range(3)] for k in range(3)]


def test_word_groups_markers():
    assert A.word_groups(["\u2581The", "\u2581Constan", "tin", "ople", "."], "sentencepiece") == [[0], [1, 2, 3, 4]]
    assert A.word_groups(["The", "\u0120Constan", "tin", "ople", "\u010a", "Next"], "bytelevel") == \
        [[0], [1, 2, 3], [4], [5]]  # the newline token ends the word; the next one starts one
    assert A.word_groups(["the", "con", "##stan", "##tinople"], "wordpiece") == [[0], [1, 2, 3]]
    # the same byte-level tokens read as SentencePiece would be one word: the scheme matters
    assert A.word_groups(["The", "\u0120Constan", "tin"], "sentencepiece") == [[0, 1, 2]]


# ---- views: the default reduction per method, normalisation, completeness records --------------

def test_every_method_has_a_default_reduction():
    from fnattr.methods import METHODS
    from fnattr.views import DEFAULT_REDUCTION

    assert set(DEFAULT_REDUCTION) == set(METHODS)  # a new method must decide how it is shown
    assert set(DEFAULT_REDUCTION.values()) <= set(A.REDUCERS)


@pytest.mark.parametrize("method, args, how", [
    ("saliency", {"abs": True}, "l2"),
    ("integrated_gradients", {"multiply_by_inputs": True}, "sum"),
    ("integrated_gradients", {"multiply_by_inputs": False}, "l2"),  # bare integrated gradients
    ("layer_gradient_x_activation", {"multiply_by_inputs": False}, "l2"),
    ("input_x_gradient", {}, "sum"),
    ("deeplift", {}, "sum"),
    ("gradient_shap", {}, "sum"),
    ("attention", {}, "mean"),
    ("value_zeroing", {}, "mean"),
    ("my_own_method", {}, "sum"),
])
def test_default_reduction_by_method(hand, method, args, how):
    from fnattr import views

    out = hand.replace(meta={"method": method, "args": json.dumps(args)})
    assert views.default_reduction(out) == how
    shown = views.view(out)
    torch.testing.assert_close(shown.source, A.reduce(hand, how).source)
    assert views.cells(shown) == f"cells: {views._WORDS.get(how, how)} over hidden; not normalised"


def test_view_normalizes_after_reducing(hand):
    from fnattr import views

    out = hand.replace(meta={"method": "saliency"})
    shown = views.view(out, normalize=True)
    l2 = A.reduce(out, "l2")
    total = l2.source.abs().sum(-1) + l2.target.abs().sum(-1)  # [batch step]
    torch.testing.assert_close(shown.source, l2.source / total[..., None])
    torch.testing.assert_close(shown.source.abs().sum(-1) + shown.target.abs().sum(-1),
                               torch.ones(1, 2, dtype=torch.float64))
    assert views.cells(shown) == ("cells: L2 norm over hidden; normalised per step "
                                  "(|scores| of a column sum to 1)")
    assert views.view(out, reduction="max").source[0, 0].tolist() == [2, 0.5, 4]


def with_completeness(out, record, delta=None):
    meta = {**out.meta, "target_fn": "probability"}
    if record is not None:
        meta["completeness"] = record if isinstance(record, str) else json.dumps(record)
    return out.replace(meta=meta, delta=delta)


def test_completeness_record_is_read_and_tolerated(hand):
    from fnattr.convergence import convergence, unconverged

    full = {"tolerance": 0.1, "relative_error": [[0.01, 0.5]], "unconverged": [[0, 1]], "points": 8}
    conv = convergence(with_completeness(hand, full))
    assert conv.recorded and conv.bound == "10% of |f(x) - f(baseline)|"
    assert unconverged(conv, hand, 0) == [1] and conv.error[(0, 1)] == 0.5 and conv.points == ("8",)
    # no "unconverged": derived from relative_error and tolerance (0.05 when missing)
    conv = convergence(with_completeness(hand, {"relative_error": [[0.06, None]]}))
    assert unconverged(conv, hand, 0) == [0] and conv.bound.startswith("5% ")
    # junk entries and out-of-range indices are ignored; points per step give a range
    junk = {"unconverged": [[0, 7], [3, 0], "x", [0, True], [0, 0]], "points": [[4, 16]],
            "relative_error": "?", "tolerance": "high"}
    conv = convergence(with_completeness(hand, junk))
    assert unconverged(conv, hand, 0) == [0] and conv.points == ("4-16",) and conv.error == {}
    # a padded step is never flagged
    masked = hand.replace(target_mask=torch.tensor([[True, False]]))
    assert unconverged(convergence(with_completeness(masked, full)), masked, 0) == []
    # no record and no delta: nothing to check
    assert convergence(with_completeness(hand, None)) is None


def test_completeness_falls_back_to_delta_against_the_step_score(hand):
    from fnattr.convergence import convergence, unconverged

    # probability is [[0, 1]]: step 0 has score 0, so any delta there is too large
    delta = torch.tensor([[0.001, 0.04]], dtype=torch.float64)
    for record in (None, "{not json", json.dumps([1, 2])):
        conv = convergence(with_completeness(hand, record, delta))
        assert not conv.recorded and conv.bound == "5% of |probability|"
        assert unconverged(conv, hand, 0) == [0]
    conv = convergence(with_completeness(hand, None, torch.tensor([[0.0, 0.06]], dtype=torch.float64)))
    assert unconverged(conv, hand, 0) == [1] and conv.error[(0, 1)] == pytest.approx(0.06)
    # after merging steps the record's indices no longer apply: delta decides
    merged = A.merge(with_completeness(hand, {"unconverged": [[0, 1]]}, delta))
    assert not convergence(merged).recorded

import functools
import math
import warnings

import pytest
import torch

import fnattr
from fnattr import AttributionTensors, evaluate, prepare, targets
from fnattr.evaluate.ranking import count_of, keys, ranks
from fnattr.contrast import prepare_contrast
from fnattr.evaluate import Faithfulness, faithfulness
from fnattr.methods import input_x_gradient
from fnattr.views import default_reduction
from tests.conftest import _get
from tests.one_token_model import one_token_gpt2
from tests.reference import _embeddings, prefix_inputs
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"
FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)
K = 4  # curve levels in the reference tests: fractions 0, 1/4, ..., 1


# ---- a plain per-step reference: one model run per (step, level), no fnattr engine -------------

def _last_logits(model, src, tgt, t, start, drop_src, drop_tgt, removal):
    """Logits of step t for one unpadded example without the `drop_*` tokens: replaced by the
    UNK embedding ("auto" on these tokenizers), or deleted ("mask": a decoder-only model reads
    the shortened sequence; an encoder-decoder model gets an encoder attention mask)."""
    enc_dec = model.config.is_encoder_decoder
    if removal == "mask" and not enc_dec:
        ids = [int(x) for i, x in enumerate(src) if i not in drop_src]
        ids += [int(x) for j, x in enumerate(tgt[:t]) if j not in drop_tgt]
        return model(input_ids=torch.tensor([ids])).logits[0, -1]
    if removal == "mask":
        keep = torch.tensor([[i not in drop_src for i in range(len(src))]]).long()
        dec = torch.cat([torch.tensor([start]), tgt[:t]])[None]
        return model(input_ids=src[None], attention_mask=keep, decoder_input_ids=dec).logits[0, -1]
    s, p = prefix_inputs(model, src, tgt, t, start)
    for side, emb, drop, off in (("source", s, drop_src, 0), ("target", p, drop_tgt, int(enc_dec))):
        unk = _embeddings(model, side)(torch.tensor([3]))[0].detach()
        for i in drop:
            emb[i + off] = unk
    if enc_dec:
        return model(inputs_embeds=s[None], decoder_inputs_embeds=p[None]).logits[0, -1]
    return model(inputs_embeds=torch.cat([s, p])[None]).logits[0, -1]


def _candidates(model, batch, out, t, removal):
    """(side, index) of the tokens step t can lose, source first, in position order."""
    src_special, tgt_special = batch.source_special[0], batch.target_special[0]
    cands = [("s", i) for i in range(len(src_special)) if not src_special[i]]
    if out.target is not None:
        cands += [("t", j) for j in range(t) if not tgt_special[j]]
    if removal == "mask" and not model.config.is_encoder_decoder:  # the query token stays
        cands.remove(("s", len(src_special) - 1) if t == 0 else ("t", t - 1))
    return cands


def _reference(model, batch, out, target_fn, removal, *, ranking="step", sign="signed"):
    """Every metric of `out`, per step, from plain forwards on the perturbed prefix."""
    src, tgt, start = batch.source_ids[0], batch.target_ids[0], batch.decoder_start_id
    assert default_reduction(out) == "sum"
    score = {"s": out.source[0].sum(-1), "t": None if out.target is None else out.target[0].sum(-1)}
    key = {"signed": lambda v: v, "positive": lambda v: max(v, 0.0), "abs": abs}[sign]
    levels = [i / K for i in range(K + 1)]
    steps = out.steps.tolist()
    per_step = [_candidates(model, batch, out, t, removal) for t in steps]
    if ranking == "example":
        union = sorted({c for cands in per_step for c in cands} - (
            {("s", len(src) - 1)} | {("t", t - 1) for t in steps if t > 0}
            if removal == "mask" and not model.config.is_encoder_decoder else set()),
            key=lambda c: (c[0] == "t", c[1]))
    want = {m: torch.zeros(len(steps), len(FRACTIONS) if m in ("comprehensiveness", "sufficiency")
                           else K + 1, dtype=torch.float64) for m in evaluate.METRICS}
    f_x = torch.zeros(len(steps), dtype=torch.float64)
    for k, t in enumerate(steps):
        if ranking == "step":
            cands = per_step[k]
            order = sorted(cands, key=lambda c: -key(float(score[c[0]][k, c[1]])))
        else:
            cands = union
            order = sorted(cands, key=lambda c: -key(float(score[c[0]][:, c[1]].sum())))
        visible = set(per_step[k]) if ranking == "step" else {
            c for c in union if c[0] == "s" or c[1] < t}

        @functools.cache
        def value(removed):
            removed = set(removed) & visible
            logits = _last_logits(model, src, tgt, t, start, {i for s, i in removed if s == "s"},
                                  {j for s, j in removed if s == "t"}, removal)
            return target_fn(logits[None, None], tgt[t].view(1, 1))[0, 0]

        with torch.no_grad():
            f = f_x[k] = value(())
            for i, q in enumerate(FRACTIONS):
                c = count_of(q, len(cands))
                want["comprehensiveness"][k, i] = f - value(tuple(order[:c]))
                want["sufficiency"][k, i] = f - value(tuple(order[c:]))
            for i, p in enumerate(levels):
                c = count_of(p, len(cands))
                want["deletion"][k, i] = value(tuple(order[:c]))
                want["insertion"][k, i] = value(tuple(order[c:]))
    return f_x, want


def test_count_of_rounds_up_and_removes_at_least_one_token():
    assert [count_of(q, 5) for q in FRACTIONS] == [1, 1, 1, 1, 3]
    assert [count_of(q, 40) for q in FRACTIONS] == [1, 2, 4, 8, 20]
    assert [count_of(p, 7) for p in (0, 0.25, 0.5, 0.75, 1)] == [0, 2, 4, 6, 7]
    assert count_of(0.5, 0) == 0


def test_rankings_by_sign():
    score = torch.tensor([0.5, -2.0, 1.0, 0.0, 7.0])
    can = torch.tensor([True, True, True, True, False])  # the last position cannot be removed
    order = {sign: ranks(keys(score, sign), can).argsort().tolist()[:4] for sign in ("signed", "positive", "abs")}
    assert order == {"signed": [2, 0, 3, 1], "positive": [2, 0, 1, 3], "abs": [1, 2, 0, 3]}
    assert int(ranks(keys(score, "signed"), can)[4]) == 4


@pytest.mark.parametrize("removal", ["auto", "mask"])
def test_metrics_equal_a_plain_per_step_computation(any_model, removal):
    model, tok = any_model
    enc_dec = model.config.is_encoder_decoder
    batch = prepare(model, tok, [SOURCE], [TARGET])
    # encoder-decoder models: target scores with the embedding baseline; mask removal is source-only
    out = input_x_gradient(model, batch, targets.logprob, attribute_target=not (enc_dec and removal == "mask"))
    got = faithfulness(model, batch, out, targets.logprob, removal=removal, curve_levels=K, n_random=0)
    f_x, want = _reference(model, batch, out, targets.logprob, removal)
    torch.testing.assert_close(got.score[0], f_x, rtol=1e-9, atol=1e-11)
    for name in evaluate.METRICS:
        torch.testing.assert_close(getattr(got, name)[0], want[name], rtol=1e-9, atol=1e-11, msg=name)
    assert (want["comprehensiveness"].abs() > 1e-5).any()  # not a vacuous comparison
    assert got.meta["removal_kind"] == removal and got.meta["method"] == "input_x_gradient"
    assert "unk" in got.meta["removal"] if removal == "auto" else "mask" in got.meta["removal"]
    torch.testing.assert_close(got.area("comprehensiveness"), got.comprehensiveness.mean(-1))
    trapezoid = (want["deletion"][:, 1:] + want["deletion"][:, :-1]).sum(-1) / (2 * K)
    torch.testing.assert_close(got.area("deletion")[0], trapezoid, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("removal,ranking,sign,start", [
    ("auto", "example", "signed", None), ("mask", "example", "abs", None),
    ("auto", "step", "positive", 1)])
def test_rankings_signs_and_step_ranges_equal_the_reference(gpt2, removal, ranking, sign, start):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = input_x_gradient(model, batch, targets.logprob, attr_pos_start=start)
    got = faithfulness(model, batch, out, targets.logprob, removal=removal, ranking=ranking,
                       sign=sign, curve_levels=K, n_random=0)
    f_x, want = _reference(model, batch, out, targets.logprob, removal, ranking=ranking, sign=sign)
    torch.testing.assert_close(got.score[0], f_x, rtol=1e-9, atol=1e-11)
    for name in evaluate.METRICS:
        torch.testing.assert_close(getattr(got, name)[0], want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_contrastive_target_reruns_its_contrast_at_the_perturbed_input(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city in Italy"],
                                contrast_targets_alignments="auto", contrast_context="own")
    fn = targets.contrast_prob_diff(contrast)
    out = input_x_gradient(model, batch, fn)
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    c_tgt = contrast.batch.target_ids[0]
    for removal in ("auto", "mask"):
        got = evaluate.comprehensiveness(model, batch, out, fn, removal=removal, n_random=0)
        for k, t in enumerate(out.steps.tolist()):
            cands = _candidates(model, batch, out, t, removal)
            order = sorted(cands, key=lambda c: -float((out.source if c[0] == "s" else out.target)
                                                       [0, k, c[1]].sum()))
            c = dict(contrast.alignments[0])[t]

            def value(removed):  # the contrast shares the source, so it loses the same source tokens
                drop_src = {i for s, i in removed if s == "s"}
                drop_tgt = {j for s, j in removed if s == "t"}
                z = _last_logits(model, src, tgt, t, None, drop_src, drop_tgt, removal)
                zc = _last_logits(model, src, c_tgt, c, None, drop_src, set(), removal)
                return z.softmax(-1)[tgt[t]] - zc.softmax(-1)[c_tgt[c]]

            with torch.no_grad():
                want = torch.stack([value(()) - value(order[:count_of(q, len(cands))]) for q in FRACTIONS])
            torch.testing.assert_close(got.comprehensiveness[0, k], want, rtol=1e-9, atol=1e-12)


# ---- known answers: a model whose every step reads one source token ----------------------------

@pytest.fixture(scope="module")
def one_token(decoder_tokenizer):
    key = decoder_tokenizer(" France", add_special_tokens=False)["input_ids"]
    assert len(key) == 1
    return one_token_gpt2(len(decoder_tokenizer), key[0]), decoder_tokenizer, key[0]


def _by_hand(batch, source: torch.Tensor, method: str = "by_hand") -> AttributionTensors:
    """An attribution with the given source scores and no target scores."""
    return AttributionTensors(
        source=source, target=None, steps=torch.arange(batch.target_ids.shape[1]), step_scores={},
        source_ids=batch.source_ids, target_ids=batch.target_ids, source_mask=batch.source_mask,
        target_mask=batch.target_mask, source_tokens=batch.source_tokens,
        target_tokens=batch.target_tokens, meta={"method": method})


def test_exact_attribution_beats_chance_and_the_reversed_ranking(one_token):
    model, tok, key = one_token
    batch = prepare(model, tok, [SOURCE], [" Paris is a"])
    n_src, n_tgt = batch.source_ids.shape[1], batch.target_ids.shape[1]
    col = batch.source_ids[0].tolist().index(key)
    gen = torch.Generator().manual_seed(1)
    exact = torch.rand(1, n_tgt, n_src, generator=gen, dtype=torch.float64) * 0.5
    exact[:, :, col] = 1.0
    runs = {name: faithfulness(model, batch, _by_hand(batch, scores), targets.logit, n_random=200)
            for name, scores in (("exact", exact), ("reversed", -exact))}
    f = 16 / torch.arange(n_src, n_src + n_tgt, dtype=torch.float64)  # 16 / positions seen
    ex, rev = runs["exact"], runs["reversed"]
    torch.testing.assert_close(ex.score[0], f)
    n = len(tok(SOURCE, add_special_tokens=False)["input_ids"])  # every source token but BOS
    assert ex.removable[0].tolist() == [n] * n_tgt
    zero, full = torch.zeros(n_tgt, len(FRACTIONS), dtype=torch.float64), f[:, None].expand(-1, len(FRACTIONS))
    atol = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(ex.comprehensiveness[0], full, **atol)  # the key token goes first
    torch.testing.assert_close(ex.sufficiency[0], zero, **atol)
    torch.testing.assert_close(rev.comprehensiveness[0], zero, **atol)  # it goes last (n = 5 > 3)
    torch.testing.assert_close(rev.sufficiency[0], full, **atol)
    levels = 10
    torch.testing.assert_close(ex.area("deletion")[0], f / (2 * levels), **atol)
    torch.testing.assert_close(ex.area("insertion")[0], f * (1 - 1 / (2 * levels)), **atol)
    gone = [count_of(i / levels, n) == n for i in range(levels + 1)].index(True)  # first level without it
    curve = torch.tensor([1.0] * gone + [0.0] * (levels + 1 - gone), dtype=torch.float64)
    torch.testing.assert_close(rev.deletion[0], f[:, None] * curve, **atol)
    # chance: a random ranking removes the key token among the top c of n with probability c / n
    expected = f * sum(count_of(q, n) for q in FRACTIONS) / (len(FRACTIONS) * n)
    mean, std = ex.chance("comprehensiveness")
    assert torch.all((mean[0] - expected).abs() < 0.1 * f) and torch.all(std[0] > 0)
    for run in (ex, rev):  # the same draws whatever the attribution
        torch.testing.assert_close(run.random_deletion, ex.random_deletion)
    for name in evaluate.METRICS:
        better = 1 if evaluate.HIGHER_IS_BETTER[name] else -1
        chance = ex.chance(name)[0][0]
        assert torch.all(better * (ex.area(name)[0] - chance) > 0.1 * f), name
        assert torch.all(better * (chance - rev.area(name)[0]) > 0.1 * f), name
        summary = ex.summary()[name]
        assert better * (summary["value"] - summary["random_mean"]) > 0 and summary["random_std"] > 0


def test_a_random_attribution_scores_near_the_random_baseline(one_token):
    model, tok, _ = one_token
    rows = 32
    batch = prepare(model, tok, [SOURCE] * rows, [" Paris is a"] * rows)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(rows, batch.target_ids.shape[1], batch.source_ids.shape[1], generator=gen,
                         dtype=torch.float64)
    got = faithfulness(model, batch, _by_hand(batch, scores), targets.logit, n_random=8,
                       internal_batch_size=256)
    for name in evaluate.METRICS:  # mean over 32 rows x 3 steps vs 8 draws of the same
        ours = (got.area(name) / got.score).mean()
        chance = (got.area(name, random=True) / got.score).mean()
        assert abs(float(ours - chance)) < 0.1, name


# ---- layout, batching, state, errors, files ---------------------------------------------------

def _row(out: AttributionTensors, single, i: int) -> AttributionTensors:
    """Row i of a batch's attribution, as the attribution of `single` (that row alone)."""
    cols, n_tgt = out.source_mask[i], single.target_ids.shape[1]
    return out.replace(
        source=out.source[i:i + 1, :n_tgt][:, :, cols],
        target=None if out.target is None else out.target[i:i + 1, :n_tgt, :n_tgt],
        steps=torch.arange(n_tgt), step_scores={k: v[i:i + 1, :n_tgt] for k, v in out.step_scores.items()},
        source_ids=single.source_ids, target_ids=single.target_ids, source_mask=single.source_mask,
        target_mask=single.target_mask, source_tokens=single.source_tokens,
        target_tokens=single.target_tokens, delta=None)


@pytest.mark.parametrize("name", ["gpt2", "bart"])
@pytest.mark.parametrize("ranking", ["step", "example"])
def test_batch_equals_its_rows_run_alone(request, name, ranking):
    model, tok = _get(request, name)
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    tgts = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, tgts)
    out = input_x_gradient(model, batch, attribute_target=True)
    options = dict(removal="auto", ranking=ranking, curve_levels=3, n_random=0)
    got = faithfulness(model, batch, out, internal_batch_size=7, **options)
    for i in range(len(sources)):
        single = prepare(model, tok, sources[i], tgts[i])
        one = faithfulness(model, single, _row(out, single, i), **options)
        n = single.target_ids.shape[1]
        for metric in evaluate.METRICS:
            torch.testing.assert_close(getattr(got, metric)[i, :n], getattr(one, metric)[0],
                                       rtol=1e-8, atol=1e-12)
            assert torch.all(getattr(got, metric)[i, n:] == 0)  # padding steps
        assert torch.equal(got.removable[i, :n], one.removable[0])


def test_example_ranking_runs_one_removal_per_level_for_every_step(seq2seq_model):
    model, tok = seq2seq_model
    batch = prepare(model, tok, [SOURCE, "A dog ran"], [TARGET, " in the park"])
    out = input_x_gradient(model, batch)  # source only: every step can lose the same tokens
    same = out.replace(source=out.source[:, :1].expand_as(out.source).contiguous()
                       * batch.target_mask[:, :, None, None])  # one ranking for every step
    by = {r: faithfulness(model, batch, same, ranking=r, n_random=0) for r in ("step", "example")}
    for name in evaluate.METRICS:
        torch.testing.assert_close(getattr(by["step"], name), getattr(by["example"], name),
                                   rtol=1e-9, atol=1e-12)
    # identical inputs run once: here the steps' removals coincide under either ranking
    levels = 2 * len(FRACTIONS) + 2 * 10  # per (example, draw), before identical inputs merge
    rows = {r: int(f.meta["forward_rows"]) for r, f in by.items()}
    assert rows["step"] == rows["example"] <= len(batch) * levels
    # with the method's own per-step rankings, ranking="example" still runs one row per level
    own = {r: int(faithfulness(model, batch, out, ranking=r, n_random=2).meta["forward_rows"])
           for r in ("step", "example")}
    assert own["example"] <= len(batch) * levels * 3 and own["example"] < own["step"]


def test_model_and_random_state_unchanged_also_after_an_error(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = input_x_gradient(model, batch)
    before, rng = snapshot(model), torch.get_rng_state()
    options = dict(curve_levels=2, n_random=1)
    for metric in (evaluate.comprehensiveness, evaluate.sufficiency, evaluate.deletion, evaluate.insertion):
        assert metric(model, batch, out, **options).metrics == (metric.__name__,)
        assert_unchanged(model, before)
    faithfulness(model, batch, out, removal="mask" if out.target is None else "zeros", **options)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)

    def fails_on_perturbed(logits, target_ids):
        if logits.shape[0] > 1:
            raise ArithmeticError("inside")
        return targets.probability(logits, target_ids)

    for removal in ("auto", "mask"):
        with pytest.raises(ArithmeticError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "attributions explain 'probability'"
            faithfulness(model, batch, out.replace(target=None), fails_on_perturbed, removal=removal,
                         **options)
        assert_unchanged(model, before)


def test_bad_arguments_name_the_argument_and_the_fix(gpt2, request):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = input_x_gradient(model, batch)
    for options, match in (
            (dict(fractions=(0.0, 0.5)), r"`fractions`.*\(0, 1\]"),
            (dict(fractions=(0.5, 1.5)), r"`fractions`.*\(0, 1\]"),
            (dict(fractions=()), r"`fractions`"),
            (dict(removal="blank"), r"`removal`.*'auto'.*'mask'"),
            (dict(ranking="token"), r"`ranking`.*'example'"),
            (dict(sign="negative"), r"`sign`.*'abs'"),
            (dict(curve_levels=0), r"`curve_levels`.*at least 1"),
            (dict(n_random=-1), r"`n_random`.*at least 0"),
            (dict(internal_batch_size=0), r"`internal_batch_size`"),
            (dict(metrics=("aopc",)), r"`metrics`.*comprehensiveness")):
        with pytest.raises(ValueError, match=match):
            faithfulness(model, batch, out, **options)
    other = prepare(model, tok, ["A dog"], [TARGET])
    with pytest.raises(ValueError, match=r"`attributions`.*another batch.*pass the batch"):
        faithfulness(model, other, out)
    bart, btok = _get(request, "bart")
    bbatch = prepare(bart, btok, [SOURCE], [TARGET])
    with pytest.raises(ValueError, match=r"`removal`='mask'.*removal='auto'"):
        faithfulness(bart, bbatch, input_x_gradient(bart, bbatch, attribute_target=True), removal="mask")
    with pytest.warns(UserWarning, match="explain 'probability'"):
        evaluate.deletion(model, batch, out, targets.logprob, n_random=0, curve_levels=1)
    faith = faithfulness(model, batch, out, metrics=("deletion",), n_random=0, curve_levels=1)
    with pytest.raises(ValueError, match=r"`name`='sufficiency'.*\['deletion'\]"):
        faith.area("sufficiency")
    with pytest.raises(ValueError, match="n_random >= 1"):
        faith.chance("deletion")


def test_save_load_round_trip_bit_exact(gpt2, tmp_path):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE, "A dog"], [TARGET, " ran"])
    out = input_x_gradient(model, batch)
    faith = faithfulness(model, batch, out, n_random=2, curve_levels=3)
    faith.save(tmp_path / "faith.safetensors")
    back = evaluate.load(tmp_path / "faith.safetensors")
    assert isinstance(back, Faithfulness) and back.meta == faith.meta
    for field in ("score", "steps", "step_mask", "removable", "fractions", "levels", *evaluate.METRICS,
                  *(f"random_{m}" for m in evaluate.METRICS)):
        a, b = getattr(faith, field), getattr(back, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert back.summary() == faith.summary()
    part = evaluate.sufficiency(model, batch, out, n_random=0)
    evaluate.save(part, tmp_path / "part.safetensors")
    assert evaluate.load(tmp_path / "part.safetensors").metrics == ("sufficiency",)
    assert evaluate.load(tmp_path / "part.safetensors").random_sufficiency is None
    out.save(tmp_path / "attr.safetensors")
    with pytest.raises(ValueError, match="not an fnattr faithfulness result"):
        evaluate.load(tmp_path / "attr.safetensors")
    assert fnattr.load(tmp_path / "attr.safetensors").meta == out.meta
    assert math.isclose(faith.per_example("deletion")[1], float(faith.area("deletion")[1, :1].mean()))

"""The options an inseq user reaches for (issue 15), each against a plain reference."""

import pytest
import torch
from transformers import BartConfig, BartForCausalLM

from fnattr import prepare, targets
from fnattr.contrast import prepare_contrast
from fnattr.methods import saliency
from tests.conftest import _get
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"
SOURCES, TARGETS = [SOURCE, "A dog"], [TARGET, " ran in the park"]


def _bart_causal(request):
    """A decoder-only model whose dropout is all functional (`F.dropout(p=self.dropout)`)."""
    cache = request.getfixturevalue("models_cache")
    tok = request.getfixturevalue("decoder_tokenizer")
    if "bart_causal" not in cache:
        torch.manual_seed(0)
        cfg = BartConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, decoder_attention_heads=4,
                         decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.2,
                         attention_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         is_decoder=True, is_encoder_decoder=False)
        cache["bart_causal"] = BartForCausalLM(cfg).to(torch.float64).eval()
    return cache["bart_causal"], tok


@pytest.fixture(params=["bart_causal", "gpt2", "bart", "t5"])
def functional_dropout_model(request):
    return _bart_causal(request) if request.param == "bart_causal" else _get(request, request.param)


def _train_mode_reference(model, batch, n, seed, logprob):
    """MC dropout by hand: the whole model in training mode (its other switches are inert here),
    the n copies of the one row in one forward, seeded as fnattr seeds it."""
    src, tgt = batch.source_ids.repeat(n, 1), batch.target_ids.repeat(n, 1)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model.train()
        try:
            if model.config.is_encoder_decoder:
                dec = torch.cat([torch.full_like(tgt[:, :1], batch.decoder_start_id), tgt[:, :-1]], 1)
                logits = model(input_ids=src, decoder_input_ids=dec, use_cache=False).logits
            else:
                logits = model(input_ids=torch.cat([src, tgt[:, :-1]], 1), use_cache=False).logits
                logits = logits[:, -tgt.shape[1]:]
        finally:
            model.eval()
    score = targets.logprob if logprob else targets.probability
    return score(logits, tgt).mean(0, keepdim=True)


@pytest.mark.parametrize("logprob", [False, True], ids=["prob", "logprob"])
def test_mc_dropout_on_functional_dropout_equals_train_mode_reference(functional_dropout_model,
                                                                      logprob):
    model, tok = functional_dropout_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before, rng = snapshot(model), torch.get_rng_state()
    fn = targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=3, seed=5, logprob=logprob)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    dummy = torch.zeros(1, batch.target_ids.shape[1], 1, dtype=torch.float64)
    got = fn(dummy, batch.target_ids)
    want = _train_mode_reference(model, batch, 3, 5, logprob)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # dropout was active: not the eval-mode score
        clean = _eval_scores(model, batch, logprob)
    assert (got - clean).abs().max() > 2e-3 * clean.abs().max()


def _eval_scores(model, batch, logprob):
    from fnattr.api import compute_step_scores
    return compute_step_scores(model, batch, ["logprob" if logprob else "probability"]).popitem()[1]


def test_mc_dropout_logprob_is_a_bool_and_model_unchanged_after_errors(request):
    model, tok = _bart_causal(request)
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises(TypeError, match="logprob"):
        targets.mc_dropout_prob_avg(model, batch, logprob=1)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["contrast_prob", "contrast_prob_diff"])
def test_contrast_logprob_option_equals_log_of_the_probabilities(any_model, name):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city", " sat"],
                                contrast_targets_alignments="auto")
    plain = saliency(model, batch, targets.CONTRAST_TARGETS[name](contrast), abs=False,
                     step_scores=["probability", "logprob"], attr_pos_end=2)
    logp = saliency(model, batch, targets.CONTRAST_TARGETS[name](contrast, logprob=True), abs=False,
                    attr_pos_end=2)
    p_c = targets.probability(contrast.logits, contrast.ids)[:, :2].cpu()
    if name == "contrast_prob":
        want = p_c.log()
    else:
        want = plain.step_scores["logprob"] - p_c.log()
        # the gradient is that of log p - log p' (p' reruns at the input: the shared source)
        assert not torch.allclose(logp.source, plain.source)
    mask = batch.target_mask[:, :2]
    torch.testing.assert_close(logp.step_scores[name], want * mask)


def test_gradient_shap_without_inputs_is_the_mean_gradient(any_model):
    """One baseline (zeros), no noise: the factor x + e - b is x itself at every draw, so the
    attribution with inputs is the mean gradient times the input embedding."""
    from fnattr.methods import gradient_shap
    from tests.reference import _embeddings
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kw = {"n_samples": 3, "baseline": "zeros", "seed": 2, "attr_pos_end": 2}
    before = snapshot(model)
    local = gradient_shap(model, batch, targets.logprob, multiply_by_inputs=False, **kw)
    glob = gradient_shap(model, batch, targets.logprob, **kw)
    assert_unchanged(model, before)
    with torch.no_grad():
        x = _embeddings(model, "source")(batch.source_ids)
    x = torch.where(batch.source_special[..., None], 0, x)  # specials are their own baseline
    torch.testing.assert_close(local.source * x[:, None], glob.source, rtol=1e-9, atol=1e-14)
    assert local.delta is None and "completeness" not in local.meta and glob.delta is not None
    assert not torch.allclose(local.source, glob.source)


def _occluded_block_reference(model, batch, target_fn, block, stride):
    """Per-step loop on the unpadded row: zero `block` embedding coordinates (every `stride`) of
    one source token at a time (the "zeros" baseline); a coordinate gets the mean drop of the
    step's score over the blocks that cover it."""
    from tests.reference import prefix_inputs, step_score
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    d = prefix_inputs(model, src, tgt, 0, batch.decoder_start_id)[0].shape[-1]
    want = torch.zeros(2, len(src), d, dtype=torch.float64)
    for k in range(2):  # the first two steps
        with torch.no_grad():
            s, p = prefix_inputs(model, src, tgt, k, batch.decoder_start_id)
            f = step_score(model, s, p, int(tgt[k]), target_fn)
            for i in (~batch.source_special[0]).nonzero().squeeze(1).tolist():
                count = torch.zeros(d)
                for lo in sorted({*range(0, d - block + 1, stride), d - block}):
                    s2 = s.clone()
                    s2[i, lo:lo + block] = 0
                    want[k, i, lo:lo + block] += f - step_score(model, s2, p, int(tgt[k]), target_fn)
                    count[lo:lo + block] += 1
                want[k, i] /= count
    return want


@pytest.mark.parametrize(("block", "stride"), [(8, None), (12, 8)], ids=["tiled", "overlapping"])
def test_occlusion_over_embedding_dims_equals_per_step_reference(any_model, block, stride):
    from fnattr.methods import occlusion
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    out = occlusion(model, batch, targets.logprob, hidden_window=block, hidden_stride=stride,
                    baseline="zeros", attribute_target=False, attr_pos_end=2)
    assert_unchanged(model, before)
    assert out.extra_dims == ("hidden",)
    want = _occluded_block_reference(model, batch, targets.logprob, block, stride or block)
    torch.testing.assert_close(out.source[0], want, rtol=1e-9, atol=1e-12)
    # a block of every dimension is the token itself: each coordinate gets the token's drop
    if stride is not None:
        return
    whole = occlusion(model, batch, targets.logprob, hidden_window=10_000, baseline="zeros",
                      attribute_target=False, attr_pos_end=2)
    tokens = occlusion(model, batch, targets.logprob, baseline="zeros", attribute_target=False,
                       attr_pos_end=2)
    torch.testing.assert_close(whole.source, tokens.source[..., None].expand_as(whole.source))


@pytest.mark.parametrize(("option", "match"), [
    ({"hidden_window": 0}, "hidden_window`=0"), ({"hidden_window": 2, "hidden_stride": 0},
                                                  "hidden_stride`=0"),
    ({"hidden_stride": 2}, "without `hidden_window`"), ({"stride": 0}, "stride`=0")])
def test_occlusion_window_errors_leave_the_model_unchanged(gpt2, option, match):
    from fnattr.methods import occlusion
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        occlusion(model, batch, **option)
    assert_unchanged(model, before)


def _leave_one_out(n_samples, n_features, *, seed):
    """Sample 0 keeps everything, sample f + 1 drops feature f alone, the rest keep everything."""
    keep = torch.ones(n_samples, n_features, dtype=torch.bool)
    keep[torch.arange(1, n_features + 1), torch.arange(n_features)] = False
    return keep


def _drop_surrogate(keep, scores, weights, visible):
    """coef_f = y(input) - y(input without f): with leave-one-out masks, occlusion by hand."""
    n_feat = keep.shape[-1]
    return scores[..., :1] - scores[..., 1:n_feat + 1]


def test_lime_with_user_parts_reproduces_occlusion(any_model):
    from fnattr.methods import lime, occlusion
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    at = not model.config.is_encoder_decoder
    before = snapshot(model)
    got = lime(model, batch, targets.logprob, n_samples=24, perturb_fn=_leave_one_out,
               surrogate_fn=_drop_surrogate, attribute_target=at)
    assert_unchanged(model, before)
    want = occlusion(model, batch, targets.logprob, attribute_target=at)
    torch.testing.assert_close(got.source, want.source, rtol=1e-9, atol=1e-12)
    if at:
        torch.testing.assert_close(got.target, want.target, rtol=1e-9, atol=1e-12)


def test_lime_user_similarity_replaces_the_kernel(gpt2):
    """A constant similarity is LIME's kernel at an infinite width: the ridge fits agree."""
    from fnattr.methods import lime
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    flat = lime(model, batch, n_samples=40, seed=3,
                similarity_fn=lambda keep, visible: torch.ones(keep.shape[:-1], dtype=keep.dtype))
    wide = lime(model, batch, n_samples=40, seed=3, kernel_width=1e9)
    narrow = lime(model, batch, n_samples=40, seed=3)
    torch.testing.assert_close(flat.source, wide.source, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(flat.source, narrow.source)


@pytest.mark.parametrize(("option", "bad", "match"), [
    ("perturb_fn", lambda n, f, *, seed: torch.ones(n, f), "perturb_fn` returned torch.float32"),
    ("similarity_fn", lambda keep, vis: keep, "similarity_fn` returned"),
    ("surrogate_fn", lambda keep, y, w, vis: y, "surrogate_fn` returned")])
def test_lime_user_parts_with_wrong_shapes_are_named(gpt2, option, bad, match):
    from fnattr.methods import lime
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lime(model, batch, n_samples=4, seed=0, **{option: bad})
    assert_unchanged(model, before)


def _step_gradient(model, batch, c_batch, row, t):
    """Plain autograd of p(y_t | x, y_<t) - p'(y'_t | x, y'_<t) w.r.t. the shared source x, one
    unpadded row: the reference for the forced contrast, which attributes x through both terms."""
    from tests.reference import prefix_inputs, step_score
    src = batch.source_ids[row][batch.source_mask[row]]
    y = batch.target_ids[row][batch.target_mask[row]]
    y_c = c_batch.target_ids[row][c_batch.target_mask[row]]
    s, p = prefix_inputs(model, src, y, t, batch.decoder_start_id)
    _, p_c = prefix_inputs(model, src, y_c, t, batch.decoder_start_id)
    s = s.clone().requires_grad_()
    score = (step_score(model, s, p, int(y[t]), targets.probability)
             - step_score(model, s, p_c, int(y_c[t]), targets.probability))
    return score.detach(), torch.autograd.grad(score, s)[0]


def test_contrast_force_inputs_attributes_the_contrast_input(any_model):
    from fnattr.contrast import force_inputs
    model, tok = any_model
    contrasts = [" Rome is a city", " sat in the park"]
    batch = prepare(model, tok, SOURCES, TARGETS)
    c_tgt = prepare(model, tok, SOURCES, contrasts)
    assert torch.equal(batch.target_mask, c_tgt.target_mask)  # same lengths: one to one
    with pytest.raises(ValueError, match="contrast_context='own'"):  # forcing = the own context
        force_inputs(model, batch, prepare_contrast(model, tok, batch, contrast_targets=contrasts))
    contrast = prepare_contrast(model, tok, batch, contrast_targets=contrasts, contrast_context="own")
    before = snapshot(model)
    c_batch, forced = force_inputs(model, batch, contrast)
    assert torch.equal(c_batch.target_ids, c_tgt.target_ids)
    out = saliency(model, c_batch, targets.contrast_prob_diff(forced), abs=False)
    plain = saliency(model, batch, targets.contrast_prob_diff(contrast), abs=False)
    assert_unchanged(model, before)
    assert out.target_tokens == c_tgt.target_tokens  # the contrast's tokens are the attributed ones
    # the same expression p - p' (not p' - p), and with a shared source the same gradient
    torch.testing.assert_close(out.step_scores["contrast_prob_diff"],
                               plain.step_scores["contrast_prob_diff"])
    for row in range(len(SOURCES)):
        ms = batch.source_mask[row]
        for t in range(2):  # the first two steps
            score, grad = _step_gradient(model, batch, c_batch, row, t)
            torch.testing.assert_close(out.step_scores["contrast_prob_diff"][row, t], score)
            torch.testing.assert_close(out.source[row, t][ms], grad, rtol=1e-7, atol=1e-12)
    # the contrast's own term alone: p'(y') of the attributed (contrast) input, with a gradient
    own = saliency(model, c_batch, targets.contrast_prob(forced), abs=False, attr_pos_end=1)
    assert own.source.abs().max() > 0
    torch.testing.assert_close(own.step_scores["contrast_prob"],
                               targets.probability(contrast.logits, contrast.ids)[:, :1].cpu())


def test_contrast_force_inputs_needs_a_one_to_one_alignment(gpt2):
    from fnattr.api import attribute
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city in Italy"],
                                contrast_context="own")
    from fnattr.contrast import force_inputs
    before = snapshot(model)
    with pytest.raises(ValueError, match="contrast_force_inputs.*not one to one"):
        force_inputs(model, batch, contrast)
    with pytest.raises(ValueError, match="contrast_force_inputs=True"):
        attribute(model, tok, SOURCE, TARGET, method="saliency", contrast_force_inputs=True)
    assert_unchanged(model, before)
    out = attribute(model, tok, SOURCE, TARGET, method="saliency", target_fn="contrast_prob_diff",
                    contrast_targets=" Rome is a city", contrast_force_inputs=True,
                    contrast_context="own")
    assert out.target_tokens[0][0] == " Rome"


def test_skip_special_tokens_drops_added_specials_but_a_closing_eos(any_model):
    model, tok = any_model
    text = "<s> The cat sat"  # a special token written in the text is the user's: it stays
    kept = prepare(model, tok, [text], [TARGET])
    skipped = prepare(model, tok, [text], [TARGET], skip_special_tokens=True)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    enc_dec = model.config.is_encoder_decoder
    want = plain + [tok.eos_token_id] if enc_dec else plain
    assert skipped.source_ids[0].tolist() == want
    assert kept.source_ids[0].tolist() == (plain + [2] if enc_dec else [1] + plain)
    assert plain[0] == 1 and bool(skipped.source_special[0, 0])  # the written <s> is still special
    with pytest.raises(ValueError, match="skip_special_tokens=True"):
        prepare(model, tok, [text], chat=True, skip_special_tokens=True)


def test_include_eos_baseline_attributes_the_source_eos(seq2seq_model):
    """Occluding the source EOS by hand (the unk baseline) against occlusion's score for it."""
    from fnattr.methods import occlusion
    from tests.reference import _embeddings, prefix_inputs, step_score
    model, tok = seq2seq_model
    default = prepare(model, tok, [SOURCE], [TARGET])
    batch = prepare(model, tok, [SOURCE], [TARGET], include_eos_baseline=True)
    eos = len(batch.source_ids[0]) - 1
    assert batch.source_ids[0, eos] == tok.eos_token_id and bool(default.source_special[0, eos])
    assert not batch.source_special[0, eos]
    off = occlusion(model, default, targets.logprob, baseline="unk")
    on = occlusion(model, batch, targets.logprob, baseline="unk")
    assert torch.all(off.source[0, :, eos] == 0)
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    unk = _embeddings(model, "source")(torch.tensor([tok.unk_token_id]))[0].detach()
    for t in range(len(tgt)):
        with torch.no_grad():
            s, p = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
            s2 = s.clone()
            s2[eos] = unk
            want = (step_score(model, s, p, int(tgt[t]), targets.logprob)
                    - step_score(model, s2, p, int(tgt[t]), targets.logprob))
        torch.testing.assert_close(on.source[0, t, eos], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(on.source[0, :, :eos], off.source[0, :, :eos])


def _greedy(model, tok, source, prefix, n):
    """Greedy continuation of a target prefix, one forward per new token (the last one the
    generation config's forced EOS, where it sets one: Bart's)."""
    src = torch.tensor([tok(source)["input_ids"]])
    enc_dec = model.config.is_encoder_decoder
    out = list(prefix)
    forced = getattr(model.generation_config, "forced_eos_token_id", None)
    for i in range(n):
        if i == n - 1 and forced is not None:
            out.append(forced)
            break
        with torch.no_grad():
            if enc_dec:
                dec = torch.tensor([[model.config.decoder_start_token_id, *out]])
                logits = model(input_ids=src, decoder_input_ids=dec).logits
            else:
                logits = model(input_ids=torch.cat([src, torch.tensor([out])], 1)).logits
        out.append(int(logits[0, -1].argmax()))
        if out[-1] == tok.eos_token_id:
            break
    return out


def test_generate_from_target_prefix_continues_the_prefix(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, [" Paris is", " ran"], generate_from_target_prefix=True,
                    max_new_tokens=3)
    enc_dec = model.config.is_encoder_decoder
    for row, (source, prefix) in enumerate(zip(SOURCES, [" Paris is", " ran"])):
        ids = tok(prefix, add_special_tokens=False)["input_ids"]
        want = _greedy(model, tok, source, ids, 3)
        assert batch.target_ids[row][batch.target_mask[row]].tolist() == want
        assert len(want) > len(ids)
    assert not enc_dec or batch.decoder_start_id == model.config.decoder_start_token_id
    with pytest.raises(ValueError, match="generate_from_target_prefix=True"):
        prepare(model, tok, SOURCES, generate_from_target_prefix=True)


def test_iter_steps_streams_each_step_as_computed(any_model):
    from fnattr.api import iter_steps, step_slice
    from fnattr.methods import integrated_gradients
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    calls = []

    def method(*args, **kwargs):
        calls.append((kwargs["attr_pos_start"], kwargs["attr_pos_end"]))
        return integrated_gradients(*args, **kwargs)

    full = integrated_gradients(model, batch, targets.logprob, n_steps=2, attribute_target=True)
    stream = iter_steps(model, batch, method, targets.logprob, n_steps=2, attr_pos_start=1,
                        attribute_target=True)
    first = next(stream)
    assert calls == [(1, 2)]  # the first step came before any later step was computed
    rest = list(stream)
    n = batch.target_ids.shape[1]
    assert calls == [(k, k + 1) for k in range(1, n)] and len(rest) == n - 2
    for k, out in enumerate([first, *rest], start=1):
        want = step_slice(full, k)
        assert out.steps.tolist() == [k] == want.steps.tolist()
        torch.testing.assert_close(out.source, want.source, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.target, want.target, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.delta, want.delta, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.step_scores["logprob"], want.step_scores["logprob"])
    calls.clear()
    one_pass = list(iter_steps(model, batch, method, "logprob", steps_per_pass=None, n_steps=2,
                               attribute_target=True))
    assert calls == [(0, n)] and len(one_pass) == n
    torch.testing.assert_close(one_pass[2].source, step_slice(full, 2).source)
    with pytest.raises(ValueError, match="steps_per_pass"):
        next(iter_steps(model, batch, method, steps_per_pass=0))


def _shape_tag(words):
    """A toy tagger: capitalised word, lower-case word, or anything else."""
    out = []
    for w in words:
        w = w.strip()
        out.append("CAP" if w[:1].isupper() else "LOW" if w[:1].isalpha() else "OTHER")
    return out


def test_reagent_pos_proposals_equal_the_direct_definition(any_model):
    from fnattr.attribution import attribution_context, clean_logits
    from fnattr.methods.reagent import pos_proposals, pos_tags, proposals
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    tags = pos_tags(tok, _shape_tag)
    vocab = [tok.decode([i]) for i in range(len(tok))]
    specials = {i for _, i, _ in batch.special_tokens}
    with attribution_context(model, batch, attribute_target=True, attr_pos_start=None,
                             attr_pos_end=None) as ctx, torch.no_grad():
        base = proposals(ctx, clean_logits(ctx), None).cpu()
        got = pos_proposals(ctx, base, tags)
    ids = torch.cat([batch.source_ids, batch.target_ids], 1)
    real = torch.cat([batch.source_mask, batch.target_mask], 1)
    words = [s + t for s, t in zip(batch.source_tokens, batch.target_tokens)]
    checked = 0
    for r in range(len(batch)):
        cols = real[r].nonzero().squeeze(1).tolist()
        row_tags = _shape_tag([words[r][c] for c in cols])
        for c, tag in zip(cols, row_tags):
            support = [v for v in range(got.shape[-1]) if v < len(vocab) and v not in specials
                       and v != ids[r, c] and _shape_tag([vocab[v]])[0] == tag]
            want = torch.zeros(got.shape[-1], dtype=got.dtype)
            want[support] = 1 / len(support)
            torch.testing.assert_close(got[r, c], want if support else base[r, c])
            checked += bool(support)
    assert checked > 5


def test_reagent_with_pos_tags_runs_and_leaves_the_model_alone(gpt2):
    from fnattr.methods import reagent
    from fnattr.methods.reagent import pos_tags
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    kw = {"max_probe_steps": 3, "num_probes": 4, "generator": 0}
    pos = reagent(model, batch, pos_tags=pos_tags(tok, _shape_tag), **kw)
    plain = reagent(model, batch, **kw)
    assert_unchanged(model, before)
    assert not torch.equal(pos.source, plain.source)
    with pytest.raises(ValueError, match="tag_fn returned"):
        pos_tags(tok, lambda words: [])


def test_attribute_passes_the_prepare_options(gpt2):
    from fnattr.api import attribute
    model, tok = gpt2
    out = attribute(model, tok, SOURCE, " Paris", method="saliency", skip_special_tokens=True,
                    generate_from_target_prefix=True, max_new_tokens=2)
    assert out.source_ids[0].tolist() == tok(SOURCE, add_special_tokens=False)["input_ids"]
    assert out.target_tokens[0][0] == " Paris" and len(out.target_tokens[0]) == 3

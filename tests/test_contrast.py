"""Contrastive inputs: alignment, the one no-grad forward, and contrastive attribution."""

import pytest
import torch

import fnattr
from fnattr import prepare, targets
from fnattr.contrast import align_tokens, prepare_contrast
from fnattr.methods import integrated_gradients, saliency
from tests.reference import prefix_inputs
from tests.state import assert_unchanged, snapshot
from tests.test_step_scores import fast_options

SOURCES = ["The capital of France is", "A dog"]
TARGETS = [" Paris is a city", " ran in the park"]
CONTRASTS = [" Rome is a city in Italy", " sat on the mat"]


def _step_logits(model, src, tgt, t, start_id):
    """Reference logits of step t for one unpadded example: a plain forward of the prefix."""
    s, p = prefix_inputs(model, src, tgt, t, start_id)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(inputs_embeds=s[None], decoder_inputs_embeds=p[None]).logits[0, -1]
        return model(inputs_embeds=torch.cat([s, p])[None]).logits[0, -1]


def _unpadded(batch, row):
    return (batch.source_ids[row][batch.source_mask[row]],
            batch.target_ids[row][batch.target_mask[row]])


def test_align_tokens_matches_equal_runs():
    assert align_tokens([1, 2, 3], [1, 2, 3]) == [(0, 0), (1, 1), (2, 2)]
    assert align_tokens([5, 6, 7], [5, 9, 9, 7]) == [(0, 0), (1, 1), (2, 3)]  # replaced run
    assert align_tokens([5, 6, 8, 7], [5, 9, 7]) == [(0, 0), (1, 1), (2, 1), (3, 2)]  # longer run
    assert align_tokens([5, 6, 7], [5, 7]) == [(0, 0), (1, 1), (2, 1)]  # deleted token
    assert align_tokens([5, 7], [5, 6, 6, 7]) == [(0, 0), (1, 3)]  # inserted tokens skipped


@pytest.mark.parametrize("alignments", [None, "auto", [(0, 0)]], ids=["none", "auto", "pairs"])
def test_contrast_equal_to_target_scores_zero(any_model, alignments):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=TARGETS,
                                contrast_targets_alignments=alignments)
    assert torch.equal(contrast.ids, batch.target_ids)
    out = saliency(model, batch, targets.contrast_prob_diff(contrast), abs=False,
                   step_scores=["probability"])
    diff = out.step_scores["contrast_prob_diff"]
    assert out.step_scores["probability"].abs().max() > 0.001
    torch.testing.assert_close(diff, torch.zeros_like(diff), atol=1e-12, rtol=0)
    # p - p' is 0 for every source: the contrast reruns at the input, the gradients cancel
    torch.testing.assert_close(out.source, torch.zeros_like(out.source), rtol=0, atol=1e-12)


@pytest.mark.parametrize("context", ["same", "own"])
@pytest.mark.parametrize("side", ["targets", "sources", "both"])
def test_contrast_logits_equal_per_step_reference(any_model, side, context):
    """The contrast's logits at target position t are a plain forward of the contrast source (or
    the source) and, in the same context, the attributed prefix y_<t, in the own context the
    contrast's prefix y'_<c; its token is y'_c (c aligned with t)."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    kwargs = {"contrast_targets": CONTRASTS if side != "sources" else None,
              "contrast_sources": ["The capital of Italy is", "A cat"] if side != "targets" else None}
    before = snapshot(model)
    contrast = prepare_contrast(model, tok, batch, contrast_targets_alignments="auto",
                                contrast_context=context, **kwargs)
    assert_unchanged(model, before)
    assert contrast.reads_attributed == (side == "targets" and context == "same")
    ref = prepare(model, tok, kwargs["contrast_sources"] or SOURCES,
                  kwargs["contrast_targets"] or TARGETS)
    own = context == "own" and side != "sources"
    for row in range(len(SOURCES)):
        src, tgt = _unpadded(ref, row)
        attributed = _unpadded(batch, row)[1]
        n_target = int(batch.target_mask[row].sum())
        expected = align_tokens(attributed.tolist(), tgt.tolist())
        assert contrast.alignments[row] == tuple(expected)
        assert len(expected) == n_target
        for t, c in expected:
            want = _step_logits(model, src, tgt if own else attributed, c if own else t,
                                batch.decoder_start_id)
            torch.testing.assert_close(contrast.logits[row, t], want, rtol=1e-9, atol=1e-12)
            assert contrast.ids[row, t] == tgt[c]


def test_same_and_own_context_agree_at_the_first_step_only(decoder_model):
    """Yin & Neubig's p(y'_t | x, y_<t) and the own-context p(y'_t | x, y'_<t) share the prefix
    at step 0 and differ where the prefixes differ."""
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES[:1], [" Paris is a city"])
    scores = {}
    for context in ("same", "own"):
        contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome sat on the"],
                                    contrast_context=context)
        out = saliency(model, batch, targets.contrast_prob(contrast), abs=False)
        scores[context] = out.step_scores["contrast_prob"][0], out.source[0]
    (same, g_same), (own, g_own) = scores["same"], scores["own"]
    torch.testing.assert_close(same[0], own[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(g_same[0], g_own[0], rtol=1e-10, atol=1e-14)
    assert ((same[1:] - own[1:]).abs() > 1e-6 * own[1:].abs()).all()


def test_explicit_alignments_and_their_errors(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], [" Paris is"])
    pairs = [(0, 1), (1, 0)]
    contrast = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city"],
                                contrast_targets_alignments=pairs)
    assert contrast.alignments[0][:2] == ((0, 1), (1, 0))
    n_t, n_c = int(batch.target_mask[0].sum()), len(tok(" Rome is a city").input_ids) - 1
    # unnamed positions align from the end, as inseq fills them
    for given in (None, [(0, 0)]):
        c = prepare_contrast(model, tok, batch, contrast_targets=[" Rome is a city"],
                             contrast_targets_alignments=given)
        assert c.alignments[0][1:] == tuple((t, n_c - n_t + t) for t in range(1, n_t))
        assert c.alignments[0][0] == ((0, 0) if given else (0, n_c - n_t))
    with pytest.raises(ValueError, match="out of range"):
        prepare_contrast(model, tok, batch, contrast_targets=[" Rome"],
                         contrast_targets_alignments=[(0, 5)])
    with pytest.raises(ValueError, match="twice"):
        prepare_contrast(model, tok, batch, contrast_targets=[" Rome is"],
                         contrast_targets_alignments=[(0, 0), (0, 1)])
    with pytest.raises(ValueError, match="has no contrast position"):
        prepare_contrast(model, tok, batch, contrast_targets=[" Rome"])
    with pytest.raises(ValueError, match="one per row"):
        prepare_contrast(model, tok, batch, contrast_targets=[" Rome", " Milan"])
    with pytest.raises(ValueError, match="no contrast given"):
        prepare_contrast(model, tok, batch)
    with pytest.raises((ValueError, TypeError), match="contrast_context"):  # TypeError: jaxtyping hook
        prepare_contrast(model, tok, batch, contrast_targets=[" Rome is"], contrast_context="other")


def test_attribute_with_contrast_names(any_model):
    model, tok = any_model
    out = fnattr.attribute(model, tok, SOURCES, TARGETS, target_fn="contrast_prob_diff",
                           contrast_targets=CONTRASTS, contrast_targets_alignments="auto",
                           contrast_context="own",
                           step_scores=["entropy", "contrast_prob", "kl_divergence"],
                           target_args={"top_k": 5}, attr_pos_start=1)
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRASTS,
                                contrast_targets_alignments="auto", contrast_context="own")
    probs = contrast.logits.softmax(-1).gather(-1, contrast.ids[..., None])[..., 0]
    mask = batch.target_mask[:, 1:]
    torch.testing.assert_close(out.step_scores["contrast_prob"], probs[:, 1:] * mask)
    kl = targets.kl_divergence(contrast, top_k=5)
    alone = fnattr.api.compute_step_scores(model, batch, ["probability", kl], attr_pos_start=1)
    torch.testing.assert_close(out.step_scores["contrast_prob_diff"],
                               alone["probability"] - probs[:, 1:] * mask)
    torch.testing.assert_close(out.step_scores["kl_divergence"], alone["kl_divergence"])
    assert out.step_scores["kl_divergence"].abs().max() > 1e-6
    assert torch.equal(out.steps, torch.arange(1, batch.target_ids.shape[1]))


def test_attribute_rejects_half_given_contrast(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="go together"):
        fnattr.attribute(model, tok, SOURCES, TARGETS, contrast_targets=CONTRASTS)
    with pytest.raises(ValueError, match="go together"):
        fnattr.attribute(model, tok, SOURCES, TARGETS, target_fn="contrast_prob_diff")
    with pytest.raises(ValueError, match="none of the target functions"):
        fnattr.attribute(model, tok, SOURCES, TARGETS, target_fn="contrast_prob_diff",
                         contrast_targets=CONTRASTS, contrast_targets_alignments="auto",
                         target_args={"n_mcd_steps": 3})


def test_integrated_gradients_with_contrast_one_row(any_model):
    """A one-row contrast serves every interpolated copy: IG is complete for p - p', which
    differs from IG of p alone (the contrast reruns at every point of the path)."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRASTS[:1],
                                contrast_targets_alignments="auto")
    out = integrated_gradients(model, batch, targets.contrast_logits_diff(contrast), n_steps=24,
                               internal_batch_size=7, attribute_target=True)
    plain = integrated_gradients(model, batch, targets.logit, n_steps=24, internal_batch_size=7,
                                 attribute_target=True)
    expected = out.source.flatten(2).sum(-1) + out.target.flatten(2).sum(-1) - out.delta
    assert out.delta.abs().max() < 0.05 * expected.abs().max()
    assert (out.source - plain.source).abs().max() > 1e-3 * plain.source.abs().max()


def test_integrated_gradients_with_contrast_batched_equals_unbatched(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRASTS,
                                contrast_targets_alignments="auto")
    out = integrated_gradients(model, batch, targets.contrast_prob_diff(contrast), n_steps=6,
                               internal_batch_size=5)
    for row in range(len(SOURCES)):
        one = batch.select([row])
        c = prepare_contrast(model, tok, one, contrast_targets=CONTRASTS[row:row + 1],
                             contrast_targets_alignments="auto")
        single = integrated_gradients(model, one, targets.contrast_prob_diff(c), n_steps=6)
        n, s = single.source.shape[1:3]
        src_cols = batch.source_mask[row].nonzero().squeeze(1)
        torch.testing.assert_close(out.source[row, :n][:, src_cols], single.source[0, :, -s:])


@pytest.mark.parametrize("name", sorted(fnattr.methods.METHODS))
def test_contrast_target_with_every_method(any_model, name):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRASTS[:1],
                                contrast_targets_alignments="auto")
    method = fnattr.methods.METHODS[name]
    out = method(model, batch, targets.contrast_prob_diff(contrast),
                 step_scores=["probability", targets.contrast_prob(contrast)],
                 attr_pos_end=2, **fast_options(method))
    scores = out.step_scores
    torch.testing.assert_close(scores["contrast_prob_diff"],
                               scores["probability"] - scores["contrast_prob"])
    assert scores["contrast_prob_diff"].abs().max() > 1e-6 and torch.isfinite(out.source).all()


def test_every_step_function_in_one_attribution(any_model):
    model, tok = any_model
    names = sorted({*targets.TARGETS, *targets.CONTRAST_TARGETS})
    out = fnattr.attribute(model, tok, SOURCES, TARGETS, target_fn="pcxmi",
                           contrast_sources=["The capital of Italy is", "A cat"],
                           step_scores=names, attribute_target=True, attr_pos_end=-1)
    batch = prepare(model, tok, SOURCES, TARGETS)
    contrast = prepare_contrast(model, tok, batch, contrast_sources=["The capital of Italy is", "A cat"])
    built = [f(contrast) for f in targets.CONTRAST_TARGETS.values()]
    alone = fnattr.api.compute_step_scores(model, batch, [*targets.TARGETS, *built], attr_pos_end=-1)
    assert set(out.step_scores) == set(names) and out.target is not None
    for name in names:
        assert torch.equal(out.step_scores[name], alone[name]), name
    torch.testing.assert_close(out.step_scores["pcxmi"], out.step_scores["in_context_pvi"])
    assert out.step_scores["pcxmi"].abs().max() > 1e-6

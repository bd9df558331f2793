import pytest
import torch
from captum.attr import IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters

from fnattr import prepare
from fnattr.methods import integrated_gradients
from fnattr.methods._path import quadrature as _paths
from fnattr.targets import probability
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCE, TARGET = "The capital of France is", " Paris is a city"


def _unk_baseline(emb_module, ids, special_ids, unk_id):
    with torch.no_grad():
        unk = emb_module(torch.full_like(ids, unk_id))
        emb = emb_module(ids)
    keep = torch.isin(ids, torch.tensor(special_ids))[:, None]
    return torch.where(keep, emb, unk)


def _captum_step(model, tok, batch, t, n_steps):
    """Captum's IG of step t alone, on the prefix that step reads, with fnattr's UNK baseline."""
    src, tgt = batch.source_ids[0], batch.target_ids[0]
    s, p = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    specials = tok.all_special_ids
    if model.config.is_encoder_decoder:
        enc, dec = model.get_encoder().embed_tokens, model.get_decoder().embed_tokens
        start, p = p[:1], p[1:]
        base = (_unk_baseline(enc, src, specials, tok.unk_token_id),
                _unk_baseline(dec, tgt[:t], specials, tok.unk_token_id))
    else:
        emb = model.get_input_embeddings()
        start = p[:0]
        base = (_unk_baseline(emb, src, specials, tok.unk_token_id),
                _unk_baseline(emb, tgt[:t], specials, tok.unk_token_id))

    def f(src_emb, tgt_emb):
        return torch.stack([step_score(model, a, torch.cat([start, b]), int(tgt[t]), probability)
                            for a, b in zip(src_emb, tgt_emb)])

    ig = IntegratedGradients(f, multiply_by_inputs=True)
    attr = ig.attribute((s[None], p[None]), baselines=(base[0][None], base[1][None]),
                        n_steps=n_steps, method="gausslegendre")
    return attr[0][0], attr[1][0]


def test_quadrature_matches_captum():
    for method in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle"):
        for n in (2, 7, 32):
            alphas, weights = _paths.quadrature(method, n)
            step_sizes, points = approximation_parameters(method)
            torch.testing.assert_close(alphas, torch.tensor(points(n), dtype=torch.float64))
            torch.testing.assert_close(weights, torch.tensor(step_sizes(n), dtype=torch.float64))
            assert abs(float(weights.sum()) - 1) < 1e-12


def test_trapezoid_rule_is_exact_on_linear_functions():
    # captum 0.9's trapezoid weights sum to (n-1)/n; fnattr's are the textbook rule (sum 1).
    for n in (2, 3, 10):
        alphas, weights = _paths.quadrature("riemann_trapezoid", n)
        torch.testing.assert_close(alphas, torch.linspace(0, 1, n, dtype=torch.float64))
        assert abs(float((weights * (3 * alphas + 1)).sum()) - 2.5) < 1e-12


def test_equals_captum_per_step(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = integrated_gradients(model, batch, n_steps=8, attribute_target=True, internal_batch_size=5)
    for t in range(batch.target_ids.shape[1]):
        want_src, want_tgt = _captum_step(model, tok, batch, t, n_steps=8)
        torch.testing.assert_close(out.source[0, t], want_src, rtol=1e-6, atol=1e-10)  # captum: fp32 alphas
        torch.testing.assert_close(out.target[0, t, :t], want_tgt, rtol=1e-6, atol=1e-10)
        assert torch.all(out.target[0, t, t:] == 0)


def test_completeness_and_convergence(any_model):
    model, tok = any_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    coarse = integrated_gradients(model, batch, n_steps=4, method="riemann_trapezoid")
    fine = integrated_gradients(model, batch, n_steps=128, method="riemann_trapezoid")
    gl = integrated_gradients(model, batch, n_steps=64)
    x = fine.step_scores["probability"]
    # delta = sum(scores) - (f(x) - f(b)): recompute f(b) from it and check both runs agree on it
    f_b = (fine.source.flatten(2).sum(-1) + _target_sum(fine)) - fine.delta
    f_b2 = (coarse.source.flatten(2).sum(-1) + _target_sum(coarse)) - coarse.delta
    torch.testing.assert_close(f_b, f_b2, rtol=1e-9, atol=1e-12)
    gap = (x - f_b).abs()  # |f(x) - f(baseline)|
    assert torch.all(gap > 1e-6)
    # A few percent at most even for T5, whose ReLU makes the path only piecewise smooth.
    assert torch.all(gl.delta.abs() <= 0.05 * gap)
    assert fine.delta.abs().mean() < 0.1 * coarse.delta.abs().mean()


def _target_sum(out):
    return 0 if out.target is None else out.target.flatten(2).sum(-1)


def test_internal_batch_size_does_not_change_result(any_model):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris is a city", " ran"])
    one = integrated_gradients(model, batch, n_steps=6, internal_batch_size=1)
    all_ = integrated_gradients(model, batch, n_steps=6, internal_batch_size=1000)
    torch.testing.assert_close(one.source, all_.source, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(one.delta, all_.delta, rtol=1e-6, atol=1e-14)


def test_batched_equals_single(any_model):
    model, tok = any_model
    sources = ["The capital of France is", "A dog", "Rome is a city in"]
    targets = [" Paris.", " ran in the park today", " Italy"]
    batch = prepare(model, tok, sources, targets)
    out = integrated_gradients(model, batch, n_steps=6, attribute_target=True)
    for i in range(len(sources)):
        one = integrated_gradients(model, prepare(model, tok, sources[i], targets[i]), n_steps=6,
                                   attribute_target=True)
        n = one.target_ids.shape[1]
        torch.testing.assert_close(out.source[i, :n][:, batch.source_mask[i]], one.source[0],
                                   rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(out.target[i, :n, :n], one.target[0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(out.delta[i, :n], one.delta[0], rtol=1e-6, atol=1e-12)
        assert torch.all(out.delta[i, n:] == 0)


def test_baselines(decoder_model):
    model, tok = decoder_model
    batch = prepare(model, tok, [SOURCE], [TARGET])
    zeros = integrated_gradients(model, batch, n_steps=16, baseline="zeros")
    unk = integrated_gradients(model, batch, n_steps=16, baseline="unk")
    assert not torch.allclose(zeros.source, unk.source)
    # A tensor baseline equal to what "zeros" builds (zeros, special tokens kept) gives the same.
    with torch.no_grad():
        emb = model.get_input_embeddings()(batch.source_ids)
    given = torch.where(batch.source_special[..., None], emb, torch.zeros_like(emb))
    # (the target side of a tensor baseline is "unk", so compare with the target side held fixed)
    same = integrated_gradients(model, batch, n_steps=16, baseline=given, attribute_target=False)
    zeros_src = integrated_gradients(model, batch, n_steps=16, baseline="zeros", attribute_target=False)
    torch.testing.assert_close(same.source, zeros_src.source, rtol=1e-10, atol=1e-15)
    before = snapshot(model)
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(model, batch, baseline=torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(model, batch, baseline="noise")
    with pytest.raises(ValueError, match="method"):
        integrated_gradients(model, batch, method="simpson")
    with pytest.raises(ValueError, match="internal_batch_size"):
        integrated_gradients(model, batch, internal_batch_size=0)
    assert_unchanged(model, before)


def test_model_unchanged(any_model):
    model, tok = any_model
    before = snapshot(model)
    integrated_gradients(model, prepare(model, tok, [SOURCE], [TARGET]), n_steps=4)
    assert_unchanged(model, before)


def _completeness(out):
    import json
    return json.loads(out.meta["completeness"])


def _expected(out):
    total = out.source.flatten(2).sum(-1)
    if out.target is not None:
        total = total + out.target.flatten(2).sum(-1)
    return total - out.delta


def test_auto_meets_tolerance_per_step(gpt2):
    """n_steps="auto" with Gauss-Legendre: every step ends within the tolerance, with the points
    of the level it needed."""
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE, "A dog"], [TARGET, " ran in the park"])
    out = integrated_gradients(model, batch, tolerance=0.01, method="gausslegendre")
    info = _completeness(out)
    assert info["tolerance"] == 0.01 and info["unconverged"] == []
    expected = _expected(out)
    real = out.step_mask
    assert (out.delta.abs()[real] <= 0.01 * expected.abs()[real] + 1e-12).all()
    points = torch.tensor(info["points"])
    assert (points[real] >= 8).all() and set(points[real].tolist()) <= {8, 16, 32, 64, 128}
    assert out.meta["args"].count('"auto"') >= 1


@pytest.mark.parametrize("method, tolerance, max_steps", [
    ("gausslegendre", 5e-7, 32), ("riemann_trapezoid", 1e-3, 32), ("riemann_left", 2e-2, 64),
    ("riemann_right", 2e-2, 64)])
@pytest.mark.filterwarnings("ignore::fnattr.methods._path.refine.ConvergenceWarning")
def test_auto_equals_fixed_rule_at_the_points_each_step_used(gpt2, method, tolerance, max_steps):
    """Each step's refined scores are exactly those of a fixed rule with that step's points, also
    where a level reuses the last one's points (the Riemann rules: 8, 15, 29 trapezoid points;
    8, 16, 32, 64 left or right) and adds only the new ones."""
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE, "A dog"], [TARGET, " ran in the park"])
    out = integrated_gradients(model, batch, tolerance=tolerance, max_steps=max_steps, method=method)
    points = torch.tensor(_completeness(out)["points"])
    assert len(set(points[out.step_mask].tolist())) > 1  # the steps really differ
    for n in set(points[out.step_mask].tolist()):
        fixed = integrated_gradients(model, batch, n_steps=n, method=method)
        sel = (points == n) & out.step_mask
        torch.testing.assert_close(out.source[sel], fixed.source[sel], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.target[sel], fixed.target[sel], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.delta[sel], fixed.delta[sel], rtol=1e-8, atol=1e-14)


def test_nested_levels_compute_each_point_once(gpt2):
    from fnattr.methods._path.refine import ConvergenceWarning
    """Refining riemann_trapezoid to 29 points runs 29 forwards per row and step group, where
    recomputing every level would run 8 + 15 + 29."""
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    seen = []
    real = _paths.quadrature

    def spy(method, n, *args):
        seen.append(n)
        return real(method, n, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_paths, "quadrature", spy)
        with pytest.warns(ConvergenceWarning):
            out = integrated_gradients(model, batch, tolerance=1e-9, max_steps=29, method="riemann_trapezoid")
    assert _completeness(out)["points"][0][:1] == [29]
    assert [n for n in seen if n != 8] == [], "only the first level builds a whole rule"


def test_auto_names_steps_that_miss_the_cap(gpt2):
    from fnattr.methods._path.refine import ConvergenceWarning
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    with pytest.warns(ConvergenceWarning, match=r"missed \|delta\| <= 1e-06%.*row 0 step 0 ' Paris'"):
        out = integrated_gradients(model, batch, tolerance=1e-8, max_steps=15, method="gausslegendre")
    info = _completeness(out)
    n_real = int(out.step_mask.sum())
    assert len(info["unconverged"]) == n_real and info["points"] == [[8] * n_real]


def test_fixed_n_steps_records_completeness(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    out = integrated_gradients(model, batch, n_steps=1, method="riemann_right")
    info = _completeness(out)
    rel = (out.delta.abs() / _expected(out).abs())[0].tolist()
    assert info["points"] == 1
    assert info["relative_error"][0] == pytest.approx(rel)
    assert info["unconverged"] == [[0, k] for k, r in enumerate(rel) if r > 0.05]


@pytest.mark.parametrize("options, match", [
    ({"n_steps": "many"}, "n_steps"), ({"n_steps": 0}, "n_steps"),
    ({"tolerance": 0.0}, "tolerance"), ({"tolerance": 1.5}, "tolerance"),
    ({"max_steps": 4}, "max_steps"),
])
def test_convergence_options_errors(gpt2, options, match):
    model, tok = gpt2
    batch = prepare(model, tok, [SOURCE], [TARGET])
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError: CI's jaxtyping hook
        integrated_gradients(model, batch, **options)
    assert_unchanged(model, before)

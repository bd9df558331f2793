import json
import warnings

import pytest
import torch

from fnattr import prepare
from fnattr.methods._path import quadrature as _paths
from fnattr.methods._path.refine import ConvergenceWarning
from fnattr.methods.discretized_ig import discretized_integrated_gradients as dig
from fnattr.methods.discretized_ig import monotonic_paths
from tests.methods.dig_reference import dig_path
from tests.reference import _embeddings, prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot
from fnattr.targets import logprob

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _vocab(model, side):
    module = _embeddings(model, side)
    with torch.no_grad():
        return module(torch.arange(module.weight.shape[0]))


# A hand-made 2-d vocabulary: 0 is the baseline w', 1 the input w; w's two nearest words are 2
# and 3, each outside the box [w', w] in one dimension. With m = 2 steps Monotonize moves that
# dimension to 4 - 4/2 = 2: GREEDY takes word 3, whose monotonized copy (2, 3) is 2.2 away,
# against 2.3 for word 2's (3.8, 2); MAXCOUNT (one monotonic dimension each) the nearer word 2.
HAND = torch.tensor([[0.0, 0.0], [4.0, 4.0], [3.8, 4.3], [4.2, 3.0], [1.0, 1.0], [-3.0, 6.0],
                     [8.0, -1.0], [2.5, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize(("strategy", "anchors", "points"), [
    # greedy: c1 = Monotonize(word 3) = (4 - 4/2, 3); then word 2 in the box of c1: (1, 1.5)
    ("greedy", [2, 3], [[0.0, 0.0], [1.0, 1.5], [2.0, 3.0], [4.0, 4.0]]),
    # maxcount: c1 = (3.8, 4 - 4/2); then word 3 in the box of c1: (3.8/2, 2/2)
    ("maxcount", [3, 2], [[0.0, 0.0], [1.9, 1.0], [3.8, 2.0], [4.0, 4.0]]),
])
def test_paths_by_hand(strategy, anchors, points):
    ids = torch.tensor([1])
    paths, got = monotonic_paths(HAND[ids], HAND[[0]], ids, HAND, n_steps=2, n_neighbors=2,
                                 strategy=strategy)
    assert got.tolist() == [anchors]
    torch.testing.assert_close(paths[0], torch.tensor(points, dtype=torch.float64))
    # a third step finds only words already on the path (1, 2, 3) among the last anchor's two
    # neighbours: the path goes to the baseline and stays there (the authors' fallback)
    paths, got = monotonic_paths(HAND[ids], HAND[[0]], ids, HAND, n_steps=3, n_neighbors=2,
                                 strategy=strategy)
    assert got[0, 0] == -1 and torch.equal(paths[0, 1], HAND[0])


def test_n_steps_is_the_authors_m_and_not_inseqs_point_count():
    """The authors' code (INK-USC/DIG `monotonic_paths.py`, `main.py`) takes `steps` = m anchors,
    Monotonizes by 1/m and integrates over (2^f)(m + 1) + 1 points: fnattr's `n_steps` is that
    m. inseq 0.7.1's port reads its `n_steps` N as the number of points, m = N - 2 anchors, but
    Monotonizes by 1/N. On HAND, 4 points: the same anchors, other points."""
    ids = torch.tensor([1])
    paths, anchors = monotonic_paths(HAND[ids], HAND[[0]], ids, HAND, n_steps=2, n_neighbors=2,
                                     strategy="greedy")
    authors, authors_anchors = dig_path(HAND, HAND[0], 1, 2, 2, "greedy")  # steps = 2
    assert anchors[0].tolist() == authors_anchors == [2, 3]
    assert torch.equal(paths[0], torch.stack(authors))
    inseq, inseq_anchors = dig_path(HAND, HAND[0], 1, 2, 2, "greedy", step=4)  # inseq n_steps=4
    assert inseq_anchors == authors_anchors and len(inseq) == paths.shape[1] == 4
    # c_1 = Monotonize(word 3): 4 - 4/4 = 3 (inseq) against 4 - 4/2 = 2 (authors, fnattr)
    want = torch.tensor([[0.0, 0.0], [2.25, 2.25], [3.0, 3.0], [4.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(torch.stack(inseq), want)
    assert not torch.allclose(paths[0], want)


def test_path_is_continuous_and_auto_converges_to_its_integral(gpt2):
    """The path runs from the baseline (point 0) to the input (last point) through the points
    the integration uses, and "auto" with Gauss-Legendre reaches the path integral: its
    |delta| <= tolerance * |f(x) - f(b)|, while Gauss-Legendre with 16 points per segment
    leaves round-off (completeness holds for the piecewise-linear path, no jump in it)."""
    model, tok = gpt2
    batch = prepare(model, tok, ["The cat sat on the mat and looked at"], [" the dog"])
    fine = dig(model, batch, n_steps=16, method="gausslegendre", points_per_segment=16)
    total = fine.source.flatten(2).sum(-1) + fine.target.flatten(2).sum(-1)
    assert (total - fine.delta).abs().min() > 1e-6  # f(x) - f(b) is not 0
    assert fine.delta.abs().max() < 1e-12 * (total - fine.delta).abs().max() + 1e-15
    out, _ = _refine(model, batch, cap=16, n_steps=16, method="gausslegendre", tolerance=1e-3)
    gap = total - fine.delta  # f(x) - f(b): the same paths, the same ends
    got = out.source.flatten(2).sum(-1) + out.target.flatten(2).sum(-1)
    torch.testing.assert_close(got - out.delta, gap, rtol=1e-12, atol=1e-15)
    assert (out.delta.abs() <= 1e-3 * gap.abs()).all()
    torch.testing.assert_close(got, total, rtol=2e-3, atol=0)


@pytest.mark.parametrize("strategy", ["greedy", "maxcount"])
@pytest.mark.parametrize(("n_steps", "n_neighbors"), [(3, 3), (6, 5), (9, 2)])
@pytest.mark.parametrize("base_kind", ["word", "zeros"])
def test_paths_equal_direct_implementation(strategy, n_steps, n_neighbors, base_kind):
    """All positions at once equal the one-word-at-a-time loop of `dig_reference`: same anchors,
    same points, bit for bit."""
    vocab = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ids = torch.arange(1, 12)
    base = vocab[0] if base_kind == "word" else torch.zeros(3, dtype=torch.float64)
    paths, anchors = monotonic_paths(vocab[ids], base.expand(11, 3), ids, vocab, n_steps=n_steps,
                                     n_neighbors=n_neighbors, strategy=strategy)
    assert paths.shape == (11, n_steps + 2, 3) and anchors.shape == (11, n_steps)
    for p, word in enumerate(ids.tolist()):
        want_points, want_anchors = dig_path(vocab, base, word, n_steps, n_neighbors, strategy)
        assert anchors[p].tolist() == want_anchors
        assert torch.equal(paths[p], torch.stack(want_points))
    assert not torch.any(anchors == ids[:, None])  # the input word is no anchor,
    assert base_kind == "zeros" or not torch.any(anchors == 0)  # nor is the baseline word
    assert n_neighbors > 2 or torch.any(anchors == -1)  # 2 neighbours: the fallback is reached


@pytest.mark.parametrize("strategy", ["greedy", "maxcount"])
def test_paths_are_monotonic_and_anchored_on_vocabulary(gpt2, strategy):
    model, tok = gpt2
    vocab = _vocab(model, "source")
    ids = torch.tensor([10, 57, 123, 200])
    x, base = vocab[ids], vocab[torch.full_like(ids, tok.unk_token_id)]
    paths, anchors = monotonic_paths(x, base, ids, vocab, n_steps=8, n_neighbors=32, strategy=strategy)
    assert paths.shape == (4, 10, vocab.shape[1]) and anchors.shape == (4, 8)
    torch.testing.assert_close(paths[:, 0], base, rtol=0, atol=0)
    torch.testing.assert_close(paths[:, -1], x, rtol=0, atol=0)
    steps = paths.diff(dim=1)  # [pos seg d]: every step moves each dim toward x, or stays
    direction = torch.sign(x - base)[:, None]
    assert torch.all(steps * direction >= 0)
    assert torch.all((steps * (direction == 0)).abs() == 0)
    assert torch.all((anchors >= 0) & (anchors < vocab.shape[0]))  # 32 neighbours: no fallback
    assert not torch.any(anchors == ids[:, None]) and not torch.any(anchors == tok.unk_token_id)
    for p in range(4):
        assert len(set(anchors[p].tolist())) == 8  # each anchor used once
        for k in range(1, 9):  # inner point k: the anchor's own values wherever those are monotonic
            a = vocab[anchors[p, k - 1]]
            lo = torch.minimum(base[p], paths[p, k + 1])
            hi = torch.maximum(base[p], paths[p, k + 1])
            inside = (a >= lo) & (a <= hi)
            assert torch.equal(paths[p, k][inside], a[inside])
        # the anchor next to x (a neighbour of x) shares values with it (random tiny embeddings:
        # anchors near the baseline may share none, the box around the path being small there)
        assert inside.any()
    other, _ = monotonic_paths(x, base, ids, vocab, n_steps=8, n_neighbors=32,
                               strategy="maxcount" if strategy == "greedy" else "greedy")
    assert not torch.equal(other, paths)


def test_equals_per_step_on_the_same_paths(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    # the paper's Riemann sum, gradients at the path points, here up-sampled once (the authors'
    # factor=1: 2 points per segment); one anchor, so 2 segments; baseline "unk" as built below
    n_steps, q = 1, 2
    out = dig(model, batch, logprob, n_steps=n_steps, points_per_segment=q, n_neighbors=8,
              attribute_target=True, internal_batch_size=5, baseline="unk")
    alphas, weights = _paths.quadrature("riemann_left", q)
    lo = 1 if model.config.is_encoder_decoder else 0
    for row in range(len(batch)):
        ms, mt = batch.source_mask[row], batch.target_mask[row]
        src, tgt = batch.source_ids[row][ms], batch.target_ids[row][mt]
        sp_s, sp_t = batch.source_special[row][ms], batch.target_special[row][mt]
        T = len(tgt)
        xs, xt = prefix_inputs(model, src, tgt, T - 1, batch.decoder_start_id)
        full_t = _embeddings(model, "target")(tgt).detach()
        side_paths = []
        for side, x, ids, sp in (("source", xs, src, sp_s), ("target", full_t, tgt, sp_t)):
            vocab = _vocab(model, side)
            base = torch.where(sp[:, None], x, vocab[tok.unk_token_id])
            keep = ~sp & (x != base).any(-1)
            pth = x[:, None].expand(-1, n_steps + 2, -1).clone()
            pth[keep] = monotonic_paths(x[keep], base[keep], ids[keep], vocab, n_steps=n_steps,
                                        n_neighbors=8, strategy="greedy")[0]
            side_paths.append(pth)
        ps, pt = side_paths
        for t in range(T):
            want_s, want_t = torch.zeros_like(xs), torch.zeros(t, xs.shape[1], dtype=xs.dtype)
            for k in range(n_steps + 1):
                for a, w in zip(alphas, weights):
                    s_pt = (ps[:, k] + a * (ps[:, k + 1] - ps[:, k])).requires_grad_()
                    t_pt = (pt[:t, k] + a * (pt[:t, k + 1] - pt[:t, k])).requires_grad_()
                    dec = torch.cat([xt[:lo], t_pt])
                    gs, gt = torch.autograd.grad(step_score(model, s_pt, dec, int(tgt[t]), logprob),
                                                 (s_pt, t_pt), allow_unused=True, materialize_grads=True)
                    want_s += w * gs * (ps[:, k + 1] - ps[:, k])
                    want_t += w * gt * (pt[:t, k + 1] - pt[:t, k])
            torch.testing.assert_close(out.source[row, t][ms], want_s, rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(out.target[row, t, :t], want_t, rtol=1e-7, atol=1e-12)


def test_delta_vanishes_with_points_per_segment(gpt2):
    """Completeness: the paper's Riemann sum converges as 1/points_per_segment (the authors'
    up-sampling), Gauss-Legendre on each linear segment to round-off."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    left = [float(dig(model, batch, n_steps=2, points_per_segment=q).delta.abs().sum())
            for q in (1, 3, 9)]
    assert left[2] < left[1] / 2 < left[0] / 4
    coarse = dig(model, batch, n_steps=2, method="gausslegendre", points_per_segment=1).delta.abs().max()
    fine = dig(model, batch, n_steps=2, method="gausslegendre", points_per_segment=8).delta.abs().max()
    assert fine < 1e-9 < coarse


def _refine(model, batch, cap=4, **kw):
    """An "auto" run and its ConvergenceWarnings (the refinement capped low to stay cheap)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dig(model, batch, points_per_segment="auto", max_points_per_segment=cap, **kw)
    return out, [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_batched_unchanged_and_range(any_model):
    """Refinement is per row and step: a row refines alone as in the batch, a range as in full."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    out, _ = _refine(model, batch, cap=2, n_steps=3, strategy="maxcount")
    assert_unchanged(model, before)
    points = json.loads(out.meta["completeness"])["points"]
    for row in range(len(batch)):
        one, _ = _refine(model, batch.select([row]), cap=2, n_steps=3, strategy="maxcount")
        n_tgt = int(batch.target_mask[row].sum())
        torch.testing.assert_close(out.source[row, :n_tgt][:, batch.source_mask[row]],
                                   one.source[0, :n_tgt], rtol=1e-7, atol=1e-12)
        assert json.loads(one.meta["completeness"])["points"][0] == points[row][:n_tgt]
    part, _ = _refine(model, batch, cap=2, n_steps=3, strategy="maxcount", attr_pos_start=1,
                      attr_pos_end=3)
    torch.testing.assert_close(part.source, out.source[:, 1:3], rtol=1e-9, atol=1e-12)
    with pytest.raises((ValueError, TypeError), match="strategy"):  # TypeError: CI's jaxtyping hook
        dig(model, batch, strategy="best")
    with pytest.raises(ValueError, match="n_steps"):  # n_steps = m anchors: 1 is the least
        dig(model, batch, n_steps=0)
    with pytest.raises(ValueError, match="method"):
        dig(model, batch, method="simpson")
    for bad, name in [({"points_per_segment": 0}, "points_per_segment"),
                      ({"points_per_segment": "many"}, "points_per_segment"),
                      ({"max_points_per_segment": 0}, "max_points_per_segment"),
                      ({"tolerance": 1.5}, "tolerance")]:
        with pytest.raises((ValueError, TypeError), match=name):  # TypeError: CI's jaxtyping hook
            dig(model, batch, **bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["riemann_left", "gausslegendre"])
def test_auto_refines_each_step_to_the_tolerance(gpt2, method):
    """Each step doubles its points per segment (1, 2, 4, ...) until |delta| <= 5% of
    |f(x) - f(b)|, on the same paths; a step that misses it at the cap is named in one
    ConvergenceWarning. Its scores are those of a fixed run with its points per segment, which
    the run with half of them missed the tolerance."""
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    n_steps, tol = 2, 0.05
    out, warned = _refine(model, batch, n_steps=n_steps, method=method)
    info = json.loads(out.meta["completeness"])
    assert info["tolerance"] == tol and out.meta["method"] == "discretized_integrated_gradients"
    points = torch.tensor(info["points"])  # per path: (n_steps + 1) * points per segment
    real = out.step_mask
    assert torch.all(points[~real] == 0)
    per_segment = points // (n_steps + 1)
    assert torch.all(points[real] % (n_steps + 1) == 0) and set(per_segment[real].tolist()) > {1}
    rel = {(b, k): e for b, r in enumerate(info["relative_error"]) for k, e in enumerate(r)
           if e is not None}
    bad = {tuple(p) for p in info["unconverged"]}
    assert set(rel) == set(map(tuple, real.nonzero().tolist()))  # one error per real step
    assert bad == {bk for bk, e in rel.items() if e > tol}
    assert all(per_segment[bk] == 4 for bk in bad)  # only at the cap
    assert len(warned) == (1 if bad else 0)
    for b, k in bad:
        pos = int(out.steps[k])
        assert f"row {b} step {pos} {out.target_tokens[b][pos]!r}" in str(warned[0].message)
    runs = {}
    for q in sorted(set(per_segment[real].tolist())):
        runs[q] = dig(model, batch, n_steps=n_steps, method=method, points_per_segment=q)
        at = (per_segment == q) & real
        for name in ("source", "target", "delta"):
            torch.testing.assert_close(getattr(out, name)[at], getattr(runs[q], name)[at],
                                       rtol=1e-10, atol=1e-14)
        if q > 1:
            half = dig(model, batch, n_steps=n_steps, method=method, points_per_segment=q // 2)
            missed = json.loads(half.meta["completeness"])["relative_error"]
            assert all(missed[b][k] > tol for b, k in at.nonzero().tolist())

"""method="adaptive": integrated gradients on a mesh refined per step where completeness fails."""

import json

import pytest
import torch

from fnattr import prepare
from fnattr.methods import integrated_gradients, layer_integrated_gradients
from fnattr.methods._path import adaptive as _adaptive
from fnattr.methods._path import quadrature as _paths
from fnattr.targets import probability
from tests.reference import prefix_inputs, step_score
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]


def _info(out):
    return json.loads(out.meta["completeness"])


def _meshes(monkeypatch):
    """Capture each step's final breakpoints (by (row, step index)) as `_adaptive` sums it."""
    seen = {}
    real = _adaptive._Done.add

    def spy(self, b, k, mesh, nodes):
        seen[b, k] = list(mesh)
        return real(self, b, k, mesh, nodes)

    monkeypatch.setattr(_adaptive._Done, "add", spy)
    return seen


def test_rule_is_exact_on_linear_functions_and_sums_to_one():
    mesh = [0.0, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]
    w = _adaptive.weights(mesh)
    assert min(w) == 0.03125 and 0.0 not in w  # the first interval's midpoint, never 0
    assert sum(w.values()) == pytest.approx(1, abs=1e-15)
    assert sum(a * v for a, v in w.items()) == pytest.approx(0.5, abs=1e-15)


def test_adaptive_meets_the_tolerance_on_every_step(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    out = integrated_gradients(model, batch, method="adaptive", tolerance=2e-2)
    assert_unchanged(model, before)
    info = _info(out)
    assert info["unconverged"] == []
    real = out.step_mask
    total = sum(t.flatten(2).sum(-1) for t in (out.source, out.target) if t is not None)
    expected = total - out.delta
    assert (out.delta.abs()[real] <= 2e-2 * expected.abs()[real] + 1e-12).all()
    points = torch.tensor(info["points"])
    assert (points[real] >= _adaptive.START + 1).all() and (points[~real] == 0).all()


def test_adaptive_equals_a_per_step_reference_at_its_nodes(decoder_model, monkeypatch):
    """Each step's scores are the rule's weighted sum of plain autograd gradients of that step
    alone, on its own unpadded prefix, at the nodes its mesh kept."""
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    meshes = _meshes(monkeypatch)
    out = integrated_gradients(model, batch, method="adaptive", tolerance=1e-3, baseline="zeros")
    assert len({len(m) for m in meshes.values()}) > 1  # the steps were refined differently
    for (b, k), mesh in meshes.items():
        src = batch.source_ids[b][batch.source_mask[b]]
        tgt = batch.target_ids[b][batch.target_mask[b]]
        s, p = prefix_inputs(model, src, tgt, k, batch.decoder_start_id)
        # the zero baseline, special tokens keeping their embedding
        bs = torch.where(batch.source_special[b][batch.source_mask[b]][:, None], s, 0)
        bp = torch.where(batch.target_special[b][:k][:, None], p, 0)
        want_s, want_p = torch.zeros_like(s), torch.zeros_like(p)
        for a, w in _adaptive.weights(mesh).items():
            xs, xp = (bs + a * (s - bs)).requires_grad_(), (bp + a * (p - bp)).requires_grad_()
            gs, gp = torch.autograd.grad(step_score(model, xs, xp, int(tgt[k]), probability), (xs, xp))
            want_s, want_p = want_s + w * gs * (s - bs), want_p + w * gp * (p - bp)
        torch.testing.assert_close(out.source[b, k][batch.source_mask[b]], want_s, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(out.target[b, k, :k], want_p, rtol=1e-9, atol=1e-13)


def test_a_finished_steps_nodes_are_freed_before_the_others_finish(gpt2, monkeypatch):
    """Memory: a step that meets the tolerance sums its nodes and drops them at once, so fewer
    node gradients are alive in later rounds than were computed; none outlives the call."""
    import weakref

    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    refs, alive = [], []
    real = _adaptive._evaluate

    def spy(*args):
        alive.append((sum(r() is not None for r in refs), len(refs)))
        got = real(*args)
        grads = [g for n in got.values() for g in n.grads if g is not None]
        assert all(g._base is None for g in grads)  # own storage: no chunk's tensor kept alive
        refs.extend(map(weakref.ref, grads))
        return got

    monkeypatch.setattr(_adaptive, "_evaluate", spy)
    meshes = _meshes(monkeypatch)
    integrated_gradients(model, batch, method="adaptive", tolerance=1e-4)
    assert len({len(m) for m in meshes.values()}) > 1  # some steps finished earlier than others
    assert any(live < made for live, made in alive[1:]), alive
    assert all(r() is None for r in refs)


def test_batched_equals_rows_alone(gpt2):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = integrated_gradients(model, batch, method="adaptive", tolerance=1e-4)
    for row in range(len(batch)):
        one = integrated_gradients(model, batch.select([row]), method="adaptive", tolerance=1e-4)
        n_tgt = int(batch.target_mask[row].sum())
        src = batch.source_mask[row]
        torch.testing.assert_close(out.source[row, :n_tgt][:, src],
                                   one.source[0, :n_tgt, -int(src.sum()):], rtol=1e-9, atol=1e-13)
        assert _info(out)["points"][row][:n_tgt] == _info(one)["points"][0][:n_tgt]


@pytest.mark.filterwarnings("ignore::fnattr.methods._path.refine.ConvergenceWarning")
def test_never_takes_a_gradient_at_the_baseline(decoder_model, monkeypatch):
    """The first interval uses its midpoint: no node at alpha = 0, where a zero baseline's
    gradients overflow in a bias-free model."""
    model, tok = decoder_model
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    alphas = []
    real = _adaptive._evaluate

    def spy(ctx, node, diffs, wanted, *args):
        alphas.extend(a for _, a in wanted)
        return real(ctx, node, diffs, wanted, *args)

    monkeypatch.setattr(_adaptive, "_evaluate", spy)
    out = integrated_gradients(model, batch, method="adaptive", baseline="zeros", tolerance=1e-6,
                               max_steps=32)
    assert 0 < min(alphas) < 1 / 16 and max(alphas) == 1  # [0, 1/8] was halved, never at 0
    assert torch.isfinite(out.source).all()


def test_cap_names_unconverged_steps(gpt2):
    from fnattr.methods._path.refine import ConvergenceWarning
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    with pytest.warns(ConvergenceWarning, match="max_steps"):
        out = integrated_gradients(model, batch, method="adaptive", tolerance=1e-9, max_steps=12)
    info = _info(out)
    assert info["unconverged"] and max(max(r) for r in info["points"]) <= 12


@pytest.mark.parametrize("method", [integrated_gradients, layer_integrated_gradients])
def test_a_fixed_rule_that_misses_the_tolerance_points_to_adaptive(gpt2, method):
    from fnattr.methods._path.refine import ConvergenceWarning
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    for rule, cap, says in (("gausslegendre", 8, True), ("adaptive", 12, False)):
        with pytest.warns(ConvergenceWarning, match="max_steps") as caught:
            method(model, batch, method=rule, tolerance=1e-12, max_steps=cap)
        assert [("method='adaptive'" in str(w.message)) for w in caught] == [says]


@pytest.mark.parametrize("method", [integrated_gradients, layer_integrated_gradients])
@pytest.mark.parametrize("options, match", [
    ({"n_steps": 16}, "n_steps.*adaptive"), ({"method": "simpson"}, "method.*adaptive"),
    ({"max_steps": 4}, "max_steps")])
def test_bad_options_name_the_argument_and_leave_the_model(gpt2, options, match, method):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES[:1], TARGETS[:1])
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        method(model, batch, **{"method": "adaptive", **options})
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore::fnattr.methods._path.refine.ConvergenceWarning")
def test_layer_ig_on_embeddings_equals_ig(any_model):
    """At the embedding layer layer IG's path is IG's: the same meshes and the same scores."""
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    for at in (False, True):
        ig = integrated_gradients(model, batch, method="adaptive", tolerance=1e-2, max_steps=32,
                                  attribute_target=at)
        lig = layer_integrated_gradients(model, batch, method="adaptive", tolerance=1e-2, max_steps=32,
                                         attribute_target=at, internal_batch_size=5)
        assert _info(lig)["points"] == _info(ig)["points"]
        for field in ("source", "target", "delta"):
            a, b = getattr(lig, field), getattr(ig, field)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# a block per model, and a tolerance that its steps reach within 128 nodes (these random models'
# paths are sharp)
LAYERS = {"gpt2": ("transformer.h.0", 1e-3), "llama": ("model.layers.0", 1e-3),
          "bart": ("model.decoder.layers.0", 1e-3), "t5": ("decoder.block.0", 1e-2)}


def test_layer_ig_inside_the_model_converges_to_the_rule_at_its_nodes(any_model, monkeypatch):
    """At a block's output (a decoder block for encoder-decoders): every step within the
    tolerance, and each step's scores the fixed-rule path's at that step's final mesh."""
    from fnattr.methods import layer as layer_module

    model, tok = any_model
    name, tol = LAYERS[model.config.model_type]
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)
    meshes = _meshes(monkeypatch)
    runs = []
    real = layer_module.path_sums
    monkeypatch.setattr(layer_module, "path_sums",
                        lambda *a, **k: runs.append((a, k)) or real(*a, **k))
    out = layer_integrated_gradients(model, batch, layer=name, method="adaptive", tolerance=tol,
                                     attribute_target=True)
    assert_unchanged(model, before)
    assert not runs  # the adaptive nodes do not take the fixed-rule path
    info = _info(out)
    assert info["unconverged"] == []
    real_steps = out.step_mask
    total = sum(t.flatten(2).sum(-1) for t in (out.source, out.target))
    assert (out.delta.abs()[real_steps] <= tol * (total - out.delta).abs()[real_steps] + 1e-12).all()
    assert len({len(m) for m in meshes.values()}) > 1  # the steps were refined differently
    for (b, k), mesh in list(meshes.items())[::3]:  # the fixed-rule path at this step's nodes
        rule = _adaptive.weights(mesh)
        points = (torch.tensor(list(rule), dtype=torch.float64),
                  torch.tensor(list(rule.values()), dtype=torch.float64))
        monkeypatch.setattr(_paths, "quadrature", lambda *a, **k: points)
        want = layer_integrated_gradients(model, batch, layer=name, n_steps=len(rule),
                                          attribute_target=True)
        for field in ("source", "target"):
            torch.testing.assert_close(getattr(out, field)[b, k], getattr(want, field)[b, k],
                                       rtol=1e-8, atol=1e-12)


@pytest.mark.filterwarnings("ignore::fnattr.methods._path.refine.ConvergenceWarning")
@pytest.mark.parametrize("method", [integrated_gradients, layer_integrated_gradients])
def test_the_default_rule_is_adaptive_within_its_memory_bound(gpt2, monkeypatch, method):
    """method="auto": adaptive with n_steps="auto" (the same result as naming it), Gauss-Legendre
    for a number of points, and Gauss-Legendre where adaptive's first nodes would pass
    `ADAPTIVE_BYTES`; the record names the rule that ran."""
    import importlib

    ig_module = importlib.import_module("fnattr.methods.integrated_gradients")  # not the function
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    default = method(model, batch)
    named = method(model, batch, method="adaptive")
    assert _info(default)["rule"] == "adaptive" and json.loads(default.meta["args"])["method"] == "auto"
    for field in ("source", "delta"):
        torch.testing.assert_close(getattr(default, field), getattr(named, field), rtol=0, atol=0)
    fixed = method(model, batch, n_steps=8)
    assert _info(fixed)["rule"] == "gausslegendre" and _info(fixed)["points"] == 8
    torch.testing.assert_close(fixed.source, method(model, batch, n_steps=8, method="gausslegendre").source,
                               rtol=0, atol=0)
    monkeypatch.setattr(ig_module, "ADAPTIVE_BYTES", 0)
    capped = method(model, batch)
    assert _info(capped)["rule"] == "gausslegendre"
    torch.testing.assert_close(capped.source, method(model, batch, method="gausslegendre").source,
                               rtol=0, atol=0)

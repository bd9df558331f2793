"""Progress on stderr: every method reports with `progress=True`, results do not change, silence
by default, and plain lines (not live redraws) on a non-terminal stderr."""

import re
import warnings

import pytest
import torch

import fnattr
from fnattr import prepare, progress
from fnattr.methods import METHODS
from fnattr.methods._path.refine import ConvergenceWarning

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is", " ran in the park"]
# Small settings, so that both runs of every method stay fast on the tiny models.
FAST = {
    "layer_integrated_gradients": {"n_steps": 4},
    "sequential_integrated_gradients": {"n_steps": 4},
    "discretized_integrated_gradients": {"n_steps": 2, "n_neighbors": 4, "max_points_per_segment": 2},
    "gradient_shap": {"n_samples": 4, "internal_batch_size": 3},
    "lime": {"n_samples": 8, "seed": 1, "internal_batch_size": 5},
    "occlusion": {"internal_batch_size": 4},
    "reagent": {"max_probe_steps": 4, "num_probes": 4},
    "integrated_gradients": {"max_steps": 16, "internal_batch_size": 8},  # n_steps="auto": levels
}


@pytest.fixture(autouse=True)
def _plain_stderr(monkeypatch):
    """A non-terminal stderr, whatever the environment forces (FORCE_COLOR, TTY_COMPATIBLE)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def _run(fn, model, batch, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(model, batch, **kw)


def _assert_identical(a, b):
    for name in ("source", "target", "delta", "steps"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    assert a.step_scores.keys() == b.step_scores.keys()
    for key in a.step_scores:
        assert torch.equal(a.step_scores[key], b.step_scores[key]), key
    assert a.meta == b.meta and a.extra_dims == b.extra_dims


def _line(method: str) -> re.Pattern:
    """A plain progress line of `method`: its name, maybe a detail, then a count and a unit."""
    return re.compile(rf"^{method}(, [^:\n]+)?: \d+(/\d+)? [a-z ]+, \d\d:\d\d elapsed", re.M)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reports_on_a_pipe_and_changes_nothing(gpt2, method, capfd):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    fn, kw = METHODS[method], FAST.get(method, {})
    quiet = _run(fn, model, batch, **kw)
    assert capfd.readouterr() == ("", "")  # off by default: nothing at all
    loud = _run(fn, model, batch, progress=True, **kw)
    out, err = capfd.readouterr()
    assert out == ""
    assert _line(method).search(err), err
    assert "\x1b[" not in err and "\r" not in err  # no live redraws, no escape codes in a log
    _assert_identical(quiet, loud)
    assert "progress" not in loud.meta["args"]


def test_a_seq2seq_model_reports_too(seq2seq_model, capfd):
    model, tok = seq2seq_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    for method in ("value_zeroing", "sequential_integrated_gradients", "layer_deeplift"):
        kw = FAST.get(method, {})
        quiet = _run(METHODS[method], model, batch, **kw)
        loud = _run(METHODS[method], model, batch, progress=True, **kw)
        _assert_identical(quiet, loud)
        assert _line(method).search(capfd.readouterr().err)


def test_what_the_lines_count(gpt2, capfd):
    model, tok = gpt2
    batch = prepare(model, tok, SOURCES, TARGETS)
    _run(METHODS["integrated_gradients"], model, batch, n_steps=3, internal_batch_size=4,
         progress=True)
    err = capfd.readouterr().err
    assert re.search(r"^integrated_gradients, 3 points: 6/6 forwards, ", err, re.M), err
    _run(METHODS["value_zeroing"], model, batch, progress=True)
    assert re.search(r"^value_zeroing, decoder attention: 2/2 layers, ", capfd.readouterr().err)
    _run(METHODS["reagent"], model, batch, max_probe_steps=2, num_probes=2, progress=True)
    assert re.search(r"^reagent, \d+ of \d+ steps converged: (\d+)/\1 probe rounds, ",
                     capfd.readouterr().err)
    _run(METHODS["saliency"], model, batch, progress=True)
    assert re.search(r"^saliency: 2/2 forwards, ", capfd.readouterr().err)


def test_attribute_passes_progress_through(gpt2, capfd):
    model, tok = gpt2
    quiet = fnattr.attribute(model, tok, "A dog", method="occlusion", max_new_tokens=3)
    assert capfd.readouterr() == ("", "")
    loud = fnattr.attribute(model, tok, "A dog", method="occlusion", max_new_tokens=3, progress=True)
    err = capfd.readouterr().err
    assert "generating up to 3 tokens: done in" in err
    assert _line("occlusion").search(err), err
    _assert_identical(quiet, loud)


def test_attribute_with_a_method_of_ones_own_without_progress(gpt2, capfd):
    model, tok = gpt2

    def mine(model, batch, target_fn):
        return METHODS["saliency"](model, batch, target_fn)

    out = fnattr.attribute(model, tok, "A dog", " ran", method=mine)
    assert out.meta["method"] == "saliency" and capfd.readouterr() == ("", "")


def test_disabled_is_the_stateless_no_op(capfd):
    with progress.report(False, "x", 10, unit="things") as bar:
        assert bar is progress.OFF and not bar.enabled
        bar.expect(3)
        bar.advance(5)
        bar.update(detail="level")
    with progress.status(False, "loading"):
        pass
    assert capfd.readouterr() == ("", "")
    with pytest.raises(AttributeError):
        progress.OFF.total = 1  # no state to mutate


def test_plain_lines_are_throttled_and_end_with_a_total(capfd):
    with progress.report(True, "work", unit="forwards", interval=3600) as bar:
        bar.expect(10)
        for _ in range(10):
            bar.advance()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"work: 10/10 forwards, 00:0\d elapsed", lines[0])


def test_plain_lines_show_detail_count_and_eta(capfd):
    with progress.report(True, "integrated_gradients", unit="forwards", interval=0) as bar:
        bar.update(detail="8 points")
        bar.expect(96)
        bar.advance(48)
    lines = capfd.readouterr().err.splitlines()
    assert re.fullmatch(r"integrated_gradients, 8 points: 48/96 forwards, 00:00 elapsed, ETA 00:00",
                        lines[-2]), lines
    assert lines[-1].startswith("integrated_gradients, 8 points: 48/96 forwards, 00:00 elapsed")
    assert "ETA" not in lines[-1]


def test_no_total_and_a_stop_by_an_exception(capfd):
    with pytest.raises(RuntimeError), progress.report(True, "reagent", unit="probe rounds") as bar:
        bar.advance(3)
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "reagent: 3 probe rounds, 00:00 elapsed, stopped\n"
    with pytest.raises(RuntimeError), progress.report(True, "x", unit="forwards"):
        raise RuntimeError("before any work")
    assert capfd.readouterr().err == ""


def test_status_lines(capfd):
    with progress.status(True, "loading [model]"):
        pass
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "loading [model] ..." and re.fullmatch(r"loading \[model\]: done in \d\.\d s",
                                                               lines[1])


def test_a_terminal_gets_a_live_bar(monkeypatch, capfd):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with progress.report(True, "occlusion", unit="perturbations") as bar:
        assert bar.bar is not None  # a rich Progress
        bar.expect(4)
        bar.advance(4)
    err = capfd.readouterr().err
    assert "occlusion" in err and "4/4" in err and "perturbations" in err


def test_clock():
    assert [progress._clock(s) for s in (0, 12.7, 205, 3723)] == ["00:00", "00:12", "03:25", "1:02:03"]

"""docs/adding-a-method.md holds: its one file, dropped on the methods package's path, is a method
everywhere (METHODS, `fnattr.methods.NAME`, attribute by name, the CLI listing and --method, the
views' reduction, the README's table) and computes what it says."""

import pathlib
import re
import sys

import pytest
import torch

import fnattr
import fnattr.methods
from fnattr import cli, registry
from fnattr.cli import catalog
from fnattr.render import views

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The doc's method file in a fresh folder on `fnattr.methods.__path__`, gone afterwards."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "toy_saliency.py").write_text(code)
    monkeypatch.setattr(fnattr.methods, "__path__", [*fnattr.methods.__path__, str(tmp_path)])
    catalog.method_info.cache_clear()
    yield "toy_saliency"
    sys.modules.pop("fnattr.methods.toy_saliency", None)
    vars(fnattr.methods).pop("toy_saliency", None)
    catalog.method_info.cache_clear()


def test_the_file_is_a_method_everywhere(toy, gpt2, capsys):
    assert toy in fnattr.methods.METHODS and toy in registry.specs()
    fn = fnattr.methods.METHODS[toy]
    assert getattr(fnattr.methods, toy) is fn
    assert registry.specs()[toy].family == "gradients"
    assert toy in catalog.method_names()
    assert f"| `{toy}` | gradients |" in registry.table()
    assert cli.main(["methods", toy]) == 0
    listed = capsys.readouterr().out
    assert toy in listed and "scale: float = 1.0" in listed
    # by name, through the one shared step, with an option the CLI would pass as --arg scale=2
    model, tok = gpt2
    out = fnattr.attribute(model, tok, "The cat sat on", " the mat", method=toy, scale=2.0)
    assert out.meta["method"] == toy
    assert '"scale": 2.0' in out.meta["args"] and "progress" not in out.meta["args"]
    assert views.default_reduction(out) == "l2" and views.DEFAULT_REDUCTION[toy] == "l2"
    assert "L2 norm" in " ".join(views.heatmap(out).notes)


def test_the_toy_computes_what_it_says(toy, gpt2):
    """Its scores are the saliency of the built-in method (signed), scaled; a batch is its rows."""
    model, tok = gpt2
    batch = fnattr.prepare(model, tok, ["The cat sat on", "A dog"], [" the mat", " ran in the"])
    fn = fnattr.methods.METHODS[toy]
    out = fn(model, batch, fnattr.targets.logprob, scale=3.0)
    ref = fnattr.methods.saliency(model, batch, fnattr.targets.logprob, abs=False)
    torch.testing.assert_close(out.source, 3.0 * ref.source, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.target, 3.0 * ref.target, rtol=1e-9, atol=1e-12)
    one = fn(model, batch.select([1]), fnattr.targets.logprob, scale=3.0)
    n_src, n_tgt = one.source.shape[2], one.target.shape[2]
    torch.testing.assert_close(out.source[1:, :n_tgt, -n_src:], one.source, rtol=1e-9, atol=1e-12)


def test_a_bad_declaration_is_named(tmp_path, monkeypatch):
    (tmp_path / "bad_method.py").write_text(
        "from fnattr.registry import attribution_method\n\n"
        "@attribution_method(family='gradients', reduction='median')\n"
        "def bad(model, batch, target_fn):\n    '''Bad.'''\n")
    monkeypatch.setattr(fnattr.methods, "__path__", [*fnattr.methods.__path__, str(tmp_path)])
    with pytest.raises(ValueError, match=r"fnattr.methods.bad_method.bad: `reduction`='median'"):
        registry.specs()

"""The README and docs/ say what every method and default is: their tables must match the code."""

import inspect
import pathlib
import re

from fnattr import defaults
from fnattr.api import attribute
from fnattr.cli import build_parser
from fnattr.methods import METHODS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHODS_DOC = ROOT / "docs" / "methods.md"
COMMON = {"model", "batch", "target_fn", "attribute_target", "attr_pos_start", "attr_pos_end",
          "step_scores", "progress"}


def defaults_table() -> str:
    """The README's "Method defaults" table, built from the signatures."""
    lines = ["| method | options and their defaults |", "|---|---|"]
    for name, fn in METHODS.items():
        opts = [f"`{p.name}={p.default!r}`" for p in inspect.signature(fn).parameters.values()
                if p.name not in COMMON]
        lines.append(f"| `{name}` | {', '.join(opts) or '(none)'} |")
    return "\n".join(lines)


def test_docs_list_every_method_default():
    text = METHODS_DOC.read_text()
    assert defaults_table() in text, "docs/methods.md's method defaults table is stale; it should be:\n" + \
        defaults_table()


def test_readme_method_table_is_the_registry():
    from fnattr import registry

    assert registry.table() in README.read_text(), \
        "README's table of methods is stale; it should be:\n" + registry.table()


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for link in ("docs/usage.md", "docs/methods.md", "docs/evaluation.md", "docs/datasets.md",
                 "docs/models.md", "docs/design.md", "docs/benchmarks.md",
                 "docs/adding-a-method.md", "CHANGELOG.md"):
        assert f"]({link})" in text, link
        assert (ROOT / link).is_file(), link


def test_cli_and_api_share_defaults():
    args = build_parser().parse_args(["attribute", "Hi"])
    params = inspect.signature(attribute).parameters
    assert args.method == params["method"].default == defaults.METHOD
    assert args.max_new_tokens == params["max_new_tokens"].default == defaults.MAX_NEW_TOKENS
    assert args.target_fn == params["target_fn"].default == defaults.TARGET_FN


def test_readme_names_the_shared_defaults():
    text = README.read_text()
    assert re.search(rf"`{defaults.METHOD}`.*{defaults.MAX_NEW_TOKENS} new tokens", text)

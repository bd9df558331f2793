"""Issue 24.7: one name for the text field in both commands (the other an alias), value ranges
checked before the model loads, a hub error with balanced parentheses."""

import json
import subprocess
import sys
import time

import pytest

from fnattr import cli, loading


@pytest.mark.parametrize("argv", [
    ["attribute", "The capital of France is", "--method", "occlusion", "--arg", "window=-1"],
    ["attribute", "The capital of France is", "--method", "lime", "--n-samples", "1"],
    ["attribute", "The capital of France is", "--method", "lime", "--arg", "keep_prob=1.5"],
])
def test_out_of_range_values_are_refused_before_the_model_loads(argv, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--no-save"])
    assert exit_info.value.code == 2 and time.perf_counter() - start < 1
    assert "is out of range" in capsys.readouterr().err


def test_text_field_and_its_alias_in_both_commands(tmp_path):
    """As a user runs it: both names parse in both commands (before, `--source-field` in
    attribute-dataset or `--text-field` in evaluate stopped with "unrecognized arguments")."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "Hi"}) + "\n")
    for command, extra in (("attribute-dataset", ["--out", str(tmp_path / "o")]),
                           ("evaluate", ["--methods", "saliency"])):
        for flag in ("--text-field", "--source-field"):
            run = subprocess.run([sys.executable, "-m", "fnattr", command, "--input",
                                  str(tmp_path / "d.jsonl"), flag, "text", *extra,
                                  "--model", str(tmp_path / "never")],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode != 0 and "unrecognized" not in run.stderr + run.stdout, run.stderr
            want = ("--text-field 'text' is not a field" if command == "evaluate"
                    else "could not be loaded")  # attribute-dataset checks the model first
            assert want in run.stderr, (command, flag, run.stderr)


def test_hub_error_has_balanced_parentheses(monkeypatch):
    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files (you\n"
                      "seem to be offline), and we cannot find them in the cache.")
    monkeypatch.setattr(loading, "_load_folder", offline)
    with pytest.raises(OSError) as err:
        loading.load_model("someone/some-model")
    first = str(err.value).splitlines()[0]
    assert first.count("(") == first.count(")"), first
    assert "the hub could not provide it: We couldn't connect" in first

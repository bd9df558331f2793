"""`--group-by` and `--citations` in `fnattr attribute` / `fnattr show`, and `fnattr
attribute-context` (issue 27), in process on a tiny saved model."""

import json

import pytest

from fnattr import cli
from fnattr.result import load
from tests.test_cli import model_dir  # noqa: F401 - the same tiny saved model fixture

DOCS = "The cat sat on the mat.\n\nParis is a city in France."


def test_attribute_group_by_documents_perturbs_documents_and_cites(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["attribute", DOCS, "--model", model_dir, "--method", "occlusion", "--target",
                     " A dog ran. The cat sat.", "--group-by", "documents", "--citations", "1",
                     "--save", "o.safetensors", "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    out = load(tmp_path / "o.safetensors")
    assert out.source_tokens == (("The cat sat on the mat.", "Paris is a city in France."),)
    assert out.meta["group_by"] == "documents" and out.meta["grouped"] == "sum"
    assert "Paris is a city in France." in printed and "citations (row 0, top 1 documents)" in printed
    assert printed.count("  [") == 2  # one cited document for each of the two sentences


def test_show_groups_a_saved_token_result(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attribute", DOCS, "--model", model_dir, "--method", "saliency", "--target",
                     " A dog.", "--save", "s.safetensors", "--no-table", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["show", "s.safetensors", "--group-by", "sentences"]) == 0
    printed = capsys.readouterr().out
    assert "Paris is a city in France." in printed and "The cat sat on the mat." in printed
    assert "grouped by sentences (L2 norm of a group's token scores)" in printed  # saliency
    with pytest.raises(SystemExit):
        cli.main(["show", "s.safetensors", "--group-by", "sentences", "--group-separator", "x"])
    assert "--group-separator splits documents" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--group-separator", "x"], "--group-separator splits documents"),
    (["--citations", "2"], "--citations K cites source groups"),
    (["--group-by", "documents", "--citations", "0"], "cite at least 1 group"),
    (["--group-by", "messages"], "add --chat"),
])
def test_group_usage_errors_before_loading(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(SystemExit) as info:
        cli.main(["attribute", "Hi", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_attribute_context_prints_marked_tokens_and_saves(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["attribute-context", "--model", model_dir, "--context", DOCS, "--input",
                     "The cat", "--output", " sat on the mat.", "--cti-std", "0", "--group-by",
                     "documents", "--save", "c.safetensors", "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    out = load(tmp_path / "c.safetensors")
    info = json.loads(out.meta["cti"])
    assert info["selected"] and printed.count("[[") == len(info["selected"])
    assert out.source_tokens == (("The cat sat on the mat.", "Paris is a city in France."),)
    (tmp_path / "ex.jsonl").write_text(json.dumps({"context": DOCS, "input": "The cat"}) + "\n")
    assert cli.main(["attribute-context", "--model", model_dir, "--input-file", "ex.jsonl",
                     "--max-new-tokens", "3", "--no-save", "--quiet"]) == 0
    assert "context-sensitive tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["attribute-context", "--model", model_dir, "--context", DOCS])
    assert "give --context TEXT and --input TEXT" in capsys.readouterr().err

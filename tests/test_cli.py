"""The `fnattr` command line, run in subprocesses on a tiny model saved with save_pretrained."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fnattr import cli, dataset
from fnattr.batch import prepare
from fnattr.loading import load_model
from fnattr.methods import integrated_gradients
from fnattr.result import load


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, decoder_tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(decoder_tokenizer), n_positions=64, n_embd=16,
                                       n_layer=1, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    decoder_tokenizer.save_pretrained(path)
    return str(path)


def fnattr(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fnattr.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_attribute_then_show(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fnattr("attribute", "The capital of France is", "--model", model_dir, "--method",
                 "integrated_gradients", "--n-steps", "4", "--arg", "baseline=\"pad\"",
                 "--target", " Paris.", "--step-scores", "logprob", "--html", "a.html",
                 "--png", "a.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "The capital of France is" in run.stdout and "Paris" in run.stdout
    assert "logprob" in run.stdout  # the step score row of the table
    out = load(tmp_path / cli.DEFAULT_SAVE)
    assert out.meta["method"] == "integrated_gradients"
    assert json.loads(out.meta["args"])["n_steps"] == 4 and json.loads(out.meta["args"])["baseline"] == "pad"
    # the same computation in process gives the same scores: the CLI passes everything through
    model, tok = load_model(model_dir)
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."])
    ref = integrated_gradients(model, batch, n_steps=4, baseline="pad", step_scores=("logprob",))
    torch.testing.assert_close(out.source, ref.source)
    torch.testing.assert_close(out.step_scores["logprob"], ref.step_scores["logprob"])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"

    # `show` runs in process (no model to load): same output as at save time
    assert cli.main(["show", cli.DEFAULT_SAVE, "--html", "b.html", "--no-table"]) == 0
    assert (tmp_path / "b.html").read_text() == (tmp_path / "a.html").read_text()


def test_unknown_method_is_one_line_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attribute", "Hello", "--model", "./never/loaded", "--method", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'nope' is unknown" in err and "integrated_gradients" in err


@pytest.mark.parametrize("argv, message", [
    (["show", "missing.safetensors"], "does not exist"),
    (["attribute", "Hi", "--model", "./no/such/model"], "could not be loaded"),
    (["attribute-dataset", "--input", "data.jsonl", "--text-field", "question", "--out", "o"],
     "--text-field 'question' is not a field"),
    (["attribute-dataset", "--input", "missing.jsonl", "--text-field", "q", "--out", "o"], "does not exist"),
])
def test_error_messages(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"q": "Hello"}\n')
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(Exception, match=message.split("'")[0].strip() or "."):
        cli.main([*argv, "--debug"])


def test_bad_method_option_fails_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attribute", "Hi", "--model", "./never/loaded", "--method", "saliency", "--n-steps", "3"])
    assert exit_info.value.code == 2
    assert "has no option 'n_steps'" in capsys.readouterr().err


def test_method_options_parsing():
    assert cli.method_options(["n_steps=8", "baseline=zeros"], ["--internal-batch-size", "4", "--flag",
                                                                 "--x=[1, 2]"]) == {
        "n_steps": 8, "baseline": "zeros", "internal_batch_size": 4, "flag": True, "x": [1, 2]}
    with pytest.raises(cli.UsageError, match="key=value"):
        cli.method_options(["n_steps"], [])


def test_attribute_dataset_writes_and_resumes_shards(model_dir, tmp_path, monkeypatch):
    rows = [{"q": t} for t in ("The cat sat", "Rome is", "A dog ran", "Paris is", "The fox")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("attribute-dataset", "--model", model_dir, "--method", "saliency", "--input", "d.jsonl",
            "--text-field", "q", "--out", "o", "--batch-size", "2", "--max-new-tokens", "2")
    run = fnattr(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ex/s" in run.stderr and "5/5" in run.stderr  # progress: rate and count
    paths = dataset.shards(tmp_path / "o")
    assert [p.name for p in paths] == [dataset.SHARD.format(i) for i in range(3)]
    first = [load(p) for p in paths]
    first_mtime = paths[0].stat().st_mtime_ns
    paths[-1].unlink()  # as if interrupted before the last shard
    monkeypatch.chdir(tmp_path)  # the resumed run in process: it writes only the missing shard
    assert cli.main([*args, "--quiet"]) == 0
    assert paths[0].stat().st_mtime_ns == first_mtime
    second = [load(p) for p in dataset.shards(tmp_path / "o")]
    assert [s.source_tokens for s in second] == [f.source_tokens for f in first]
    torch.testing.assert_close(second[-1].source, first[-1].source)


def test_view_flags_reach_table_html_and_png(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attribute", "The cat sat", "--model", model_dir, "--method", "saliency",
                     "--target", " on the", "--normalize", "--html", "a.html", "--png", "a.png",
                     "--quiet"]) == 0
    words = "cells: L2 norm over hidden; normalised per step"
    assert words in capsys.readouterr().out and words in (tmp_path / "a.html").read_text()
    assert cli.main(["show", cli.DEFAULT_SAVE, "--reduce", "sum", "--html", "b.html"]) == 0
    out = capsys.readouterr().out
    assert "cells: sum over hidden; not normalised" in out and "normalised per step" not in out
    assert "cells: sum over hidden" in (tmp_path / "b.html").read_text()
    saved = load(cli.DEFAULT_SAVE)
    assert saved.extra_dims == ("hidden",) and "aggregations" not in saved.meta  # file unchanged
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["show", cli.DEFAULT_SAVE, "--reduce", "median"])
    assert exit_info.value.code == 2 and "median" in capsys.readouterr().err

"""The `fnattr` command line on a tiny model saved with save_pretrained: in process, and in
subprocesses the way a user runs it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fnattr
from fnattr import cli, dataset, render
from fnattr.batch import prepare
from fnattr.loading import load_model
from fnattr.methods import integrated_gradients
from fnattr.result import load

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, decoder_tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(decoder_tokenizer), n_positions=64, n_embd=16,
                                       n_layer=1, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    decoder_tokenizer.save_pretrained(path)
    return str(path)


def fnattr_run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fnattr", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


class Loaded(BaseException):
    """Raised where the command would load a model (a BaseException: `main` does not catch it)."""


@pytest.fixture
def no_model(monkeypatch):
    """Stop the command where it would load a model."""
    def load(*args, **kwargs):
        raise Loaded
    monkeypatch.setattr(cli, "load", load)


def test_attribute_then_show(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fnattr_run("attribute", "The capital of France is", "--model", model_dir, "--method",
                     "integrated_gradients", "--n-steps", "4", "--arg", "baseline=\"pad\"",
                     "--target", " Paris.", "--step-scores", "logprob", "--html", "a.html",
                     "--png", "a.png", "--save", "run.safetensors", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "The capital of France is" in run.stdout and "Paris" in run.stdout
    assert "logprob" in run.stdout  # the step score row of the table
    out = load(tmp_path / "run.safetensors")
    assert out.meta["method"] == "integrated_gradients"
    assert json.loads(out.meta["args"])["n_steps"] == 4 and json.loads(out.meta["args"])["baseline"] == "pad"
    # the same computation in process gives the same scores: the CLI passes everything through
    model, tok = load_model(model_dir)
    batch = prepare(model, tok, ["The capital of France is"], [" Paris."])
    ref = integrated_gradients(model, batch, n_steps=4, baseline="pad", step_scores=("logprob",))
    torch.testing.assert_close(out.source, ref.source)
    torch.testing.assert_close(out.step_scores["logprob"], ref.step_scores["logprob"])
    from fnattr import request  # issue 24.3: the command line records its call in meta["request"]
    again = fnattr.api.rerun(model, tok, out)
    assert torch.equal(again.source, out.source) and again.meta["request"] == out.meta["request"]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind

    # `show` runs in process (no model to load): same output as at save time
    assert cli.main(["show", "run.safetensors", "--html", "b.html", "--no-table"]) == 0
    assert (tmp_path / "b.html").read_text() == (tmp_path / "a.html").read_text()
    assert cli.main(["show", "run.safetensors", "--html", "b.html", "--no-table"]) == 1  # exists
    assert cli.main(["show", "run.safetensors", "--html", "b.html", "--no-table", "--overwrite"]) == 0


def test_unknown_method_is_one_line_before_loading(capsys, no_model):
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


def test_bad_method_option_fails_before_loading(capsys, no_model):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attribute", "Hi", "--model", "./never/loaded", "--method", "saliency", "--n-steps", "3"])
    assert exit_info.value.code == 2
    assert "has no option 'n_steps'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--arg", "n_steps=abc"], "--arg n_steps='abc': integrated_gradients takes n_steps as int | 'auto'"),
    (["--arg", "tolerance=abc"], "--arg tolerance='abc': integrated_gradients takes tolerance as float"),
    (["--max-steps", "1.5"], "--arg max_steps=1.5: integrated_gradients takes max_steps as int"),
    (["--method", "occlusion", "--arg", "baseline=zero"],
     "takes baseline as 'auto' | 'unk' | 'pad' | 'zeros'"),
    (["--method", "saliency", "--abs", "yes"], "--arg abs='yes': saliency takes abs as bool (default True)"),
    (["--method", "nope"], "--method 'nope' is unknown"),
    (["--target-fn", "probabilty"], "--target-fn 'probabilty' is unknown"),
    (["--step-scores", "entropy", "nope"], "--step-scores 'nope' is unknown"),
    (["--target", "A", "B"], "2 --target for 1 texts"),
    (["--target-fn", "contrast_prob_diff"], "compares with a contrastive input: add --contrast-target"),
    (["--contrast-target", " Rome"], "need a contrastive --target-fn"),
    (["--target-fn", "contrast_prob_diff", "--contrast-target", "A", "B"], "2 --contrast-target for 1 texts"),
    (["--target-fn", "contrast_prob", "--contrast-target", "A", "--contrast-alignments", "x"],
     "--contrast-alignments 'x'"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: it must be at least 1"),
    (["--dtype", "float33"], "--dtype 'float33' is unknown"),
    (["--save", "a.x", "--html", "a.x"], "--save and --html both name 'a.x'"),
    (["extra", "--arg", "n_steps=16", "--tolerance", "1"], None),  # a second text is fine ...
    (["--method", "saliency", "stray"], "unexpected argument 'stray'"),  # ... a stray one is not
])
def test_usage_errors_come_before_loading(args, message, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, Loaded)) as info:
        cli.main(["attribute", "Hi", *args])
    if message is None:  # every check passed: it went on to load the model
        assert info.type is Loaded
        return
    err = capsys.readouterr().err
    assert info.type is SystemExit and info.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written, no folder made


def test_method_options_parsing():
    assert cli.method_options(["n_steps=8", "baseline=zeros"], ["--internal-batch-size", "4", "--flag",
                                                                 "--x=[1, 2]"]) == {
        "n_steps": 8, "baseline": "zeros", "internal_batch_size": 4, "flag": True, "x": [1, 2]}
    with pytest.raises(cli.UsageError, match="key=value"):
        cli.method_options(["n_steps"], [])


def test_option_values_are_converted_losslessly():
    assert cli.check_options("integrated_gradients", {"tolerance": 1, "n_steps": "auto"}) == {
        "tolerance": 1.0, "n_steps": "auto"}
    assert isinstance(cli.check_options("integrated_gradients", {"tolerance": 1})["tolerance"], float)
    got = cli.check_options("value_zeroing", {"decoder_heads": {"0": [1, 2], "1": 3}, "encoder_heads": 2})
    assert got == {"decoder_heads": {0: [1, 2], 1: 3}, "encoder_heads": 2}
    assert cli.check_options("attention", {"layers": [0], "average": ["head"]}) == {
        "layers": [0], "average": ["head"]}
    for method, opts in [("value_zeroing", {"decoder_heads": {"a": 1}}), ("attention", {"layers": [0.5]}),
                         ("reagent", {"replacing_model": "gpt2"}), ("saliency", {"abs": 1})]:
        with pytest.raises(cli.UsageError, match=f"{method} takes"):
            cli.check_options(method, opts)


def test_attribute_dataset_writes_and_resumes_shards(model_dir, tmp_path, monkeypatch):
    rows = [{"q": t} for t in ("The cat sat", "Rome is", "A dog ran", "Paris is", "The fox")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("attribute-dataset", "--model", model_dir, "--method", "saliency", "--input", "d.jsonl",
            "--text-field", "q", "--out", "o", "--batch-size", "2", "--max-new-tokens", "2")
    run = fnattr_run(*args, cwd=tmp_path)
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
                     "--save", "r.safetensors", "--quiet"]) == 0
    words = "cells: L2 norm over hidden; normalised per step"
    assert words in capsys.readouterr().out and words in (tmp_path / "a.html").read_text()
    assert cli.main(["show", "r.safetensors", "--reduce", "sum", "--html", "b.html"]) == 0
    out = capsys.readouterr().out
    assert "cells: sum over hidden; not normalised" in out and "normalised per step" not in out
    assert "cells: sum over hidden" in (tmp_path / "b.html").read_text()
    saved = load("r.safetensors")
    assert saved.extra_dims == ("hidden",) and "aggregations" not in saved.meta  # file unchanged
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["show", "r.safetensors", "--reduce", "median"])
    assert exit_info.value.code == 2 and "median" in capsys.readouterr().err


# ---- outputs: checked before the model loads, written each on its own, never overwritten ----------

SALIENCY = ["--method", "saliency", "--target", " on the", "--quiet", "--no-table"]


def test_missing_folders_are_created(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attribute", "The cat sat", "--model", model_dir, *SALIENCY,
                     "--save", "new/dir/x.safetensors", "--html", "pages/a.html", "--png", "img/a.png"]) == 0
    assert load(tmp_path / "new/dir/x.safetensors").meta["method"] == "saliency"
    assert (tmp_path / "pages/a.html").is_file() and (tmp_path / "img/a.png").is_file()


@pytest.mark.parametrize("flag, name", [("--save", "x.safetensors"), ("--html", "a.html"),
                                        ("--png", "a.png")])
def test_an_existing_file_is_refused_before_loading(flag, name, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("precious")
    assert cli.main(["attribute", "The cat sat", *SALIENCY, "--save", "new/r.safetensors",
                     flag, name]) == 1
    err = capsys.readouterr().err
    assert f"{flag} '{name}' exists: pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / name).read_text() == "precious" and not (tmp_path / "new").exists()


def test_overwrite_replaces(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_text("old")
    assert cli.main(["attribute", "The cat sat", "--model", model_dir, *SALIENCY,
                     "--save", "x.safetensors", "--overwrite"]) == 0
    assert load(tmp_path / "x.safetensors").meta["method"] == "saliency"


def test_default_save_name_is_new_each_run(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli.main(["attribute", "The cat sat", "--model", model_dir, *SALIENCY]) == 0
    files = sorted(tmp_path.glob("fnattr-out-*.safetensors"))
    assert len(files) == 2 and all(load(f).meta["method"] == "saliency" for f in files)
    assert cli.main(["attribute", "The cat sat", "--model", model_dir, *SALIENCY, "--no-save"]) == 0
    assert sorted(tmp_path.glob("fnattr-out-*.safetensors")) == files


@pytest.mark.parametrize("broken", ["save", "html", "table"])
def test_one_failing_output_does_not_cost_the_others(broken, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")
    target = {"save": (fnattr.AttributionTensors, "save"), "html": (render, "save_html"),
              "table": (render, "console")}[broken]
    monkeypatch.setattr(*target, fail)
    code = cli.main(["attribute", "The cat sat", "--model", model_dir, "--method", "saliency",
                     "--target", " on the", "--save", "r.safetensors", "--html", "a.html", "--png", "a.png"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("error:") == 1 and "disk full" in err and "Traceback" not in err
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.safetensors").exists() == (broken != "save")
    assert (tmp_path / "a.html").exists() == (broken != "html")
    assert not list(tmp_path.glob(".*.tmp"))


def test_several_texts_and_targets(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attribute", "The cat sat", "Rome is", "--model", model_dir, "--method", "saliency",
                     "--target", " on the", " a city", "--save", "r.safetensors", "--png", "p.png",
                     "--no-table"]) == 0
    out = load(tmp_path / "r.safetensors")
    assert out.source.shape[0] == 2 and "' on the'" in capsys.readouterr().out
    assert (tmp_path / "p-0.png").is_file() and (tmp_path / "p-1.png").is_file()


def test_contrastive_attribution_end_to_end(model_dir, tmp_path):
    run = fnattr_run("attribute", "The capital of France is", "--model", model_dir, "--method", "saliency",
                     "--target", " Paris", "--target-fn", "contrast_prob_diff", "--contrast-target", " Rome",
                     "--step-scores", "contrast_prob", "--save", "c.safetensors", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = load(tmp_path / "c.safetensors")
    model, tok = load_model(model_dir)
    ref = fnattr.attribute(model, tok, ["The capital of France is"], [" Paris"], method="saliency",
                           target_fn="contrast_prob_diff", contrast_targets=[" Rome"],
                           step_scores=["contrast_prob"])
    torch.testing.assert_close(out.source, ref.source)
    torch.testing.assert_close(out.step_scores["contrast_prob"], ref.step_scores["contrast_prob"])
    assert out.meta["target_fn"] == ref.meta["target_fn"]


def test_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load", interrupted)
    assert cli.main(["attribute", "Hi", "--method", "saliency", "--save", "r.safetensors"]) == 130
    assert capsys.readouterr().err == "fnattr: interrupted\n"

"""The command line's chat, dataset and show flags: each reaches the function it stands for, the
way a user runs it (one subprocess per command) and in process for the error paths."""

import copy
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
from fnattr.methods import saliency
from fnattr.result import load
from tests.test_cli import fnattr_run
from tests.test_robustness import evil_folders  # noqa: F401 - a fixture

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, decoder_tokenizer):
    """A tiny GPT2 whose tokenizer has a chat template."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(decoder_tokenizer), n_positions=64, n_embd=16,
                                       n_layer=1, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    tok = copy.deepcopy(decoder_tokenizer)
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    from tests.test_cli import Loaded

    def load(*args, **kwargs):
        raise Loaded
    monkeypatch.setattr(cli, "load", load)
    monkeypatch.setattr(cli, "_check_device", load)  # the first step that imports torch
    return Loaded


def test_chat_flags_reach_prepare(chat_dir, tmp_path):
    run = fnattr_run("attribute", "The cat sat", "--model", chat_dir, "--method", "saliency",
                     "--target", " on the mat", "--chat", "--system", "Be brief.", "--save", "c.safetensors",
                     "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = load(tmp_path / "c.safetensors")
    model, tok = load_model(chat_dir)
    batch = prepare(model, tok, ["The cat sat"], [" on the mat"], chat=True, system="Be brief.")
    assert out.source_tokens == batch.source_tokens  # the template (and its system turn) was applied
    plain = prepare(model, tok, ["The cat sat"], [" on the mat"])
    assert len(out.source_tokens[0]) > len(plain.source_tokens[0])
    ref = saliency(model, batch)
    torch.testing.assert_close(out.source, ref.source)
    # the template's own tokens are not attributed (--keep-template would attribute them)
    template = batch.source_template[0]
    assert template.any() and (out.source[0][:, template] == 0).all()  # [steps, source, hidden]
    assert (out.source[0][:, ~template & batch.source_mask[0]] != 0).any()


@pytest.mark.parametrize("args, message", [
    (["--system", "x"], "--system applies to chat prompts: add --chat"),
    (["--keep-template"], "--keep-template applies to chat prompts: add --chat"),
    (["--chat", "--target-fn", "contrast_prob_diff", "--contrast-source", "A dog"],
     "--contrast-source with --chat"),
    (["--device-map", "[1]"], "--device-map '[1]'"),  # model options are checked before loading too
])
def test_chat_flag_errors_before_loading(args, message, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["attribute", "The cat", "--no-save", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def _rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_dataset_flags_ids_skip_reduce_chat_then_show(chat_dir, tmp_path):
    rows = [{"q": "The cat sat", "k": "a"}, {"q": "", "k": "b"}, {"q": "Rome is", "k": "c"},
            "not json", {"q": "A dog ran", "k": "d"}]
    _rows(tmp_path / "d.jsonl", rows)
    args = ("attribute-dataset", "--model", chat_dir, "--method", "saliency", "--input", "d.jsonl",
            "--text-field", "q", "--id-field", "k", "--out", "o", "--batch-size", "2",
            "--max-new-tokens", "2", "--reduce", "sum", "--on-bad-row", "skip", "--chat")
    run = fnattr_run(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "2 bad rows skipped" in run.stderr
    shards = [load(p) for p in dataset.shards(tmp_path / "o")]
    assert [i for s in shards for i in dataset.ids(s)] == ["a", "c", "d"]
    assert all(s.source.dim() == 3 for s in shards)  # reduced to one score per token before saving
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    assert record["config"]["id_field"] == "k" and record["config"]["chat"] is True
    assert "on_bad_row" not in record["config"]  # how bad rows are handled does not bind a resume
    assert [b["line"] for b in record["skipped"]] == [2, 4]
    model, tok = load_model(chat_dir)
    batch = prepare(model, tok, ["The cat sat", "Rome is"], max_new_tokens=2, chat=True)
    assert shards[0].source_tokens == batch.source_tokens
    torch.testing.assert_close(shards[0].source, saliency(model, batch).source.sum(-1))

    # the same run stopped by its first bad row names the file line and writes nothing
    stop = fnattr_run(*[a for a in args if a not in ("--on-bad-row", "skip")][:-1], "--out", "p", cwd=tmp_path)
    assert stop.returncode == 1 and "d.jsonl:2" in stop.stderr and "--on-bad-row skip" in stop.stderr
    assert not (tmp_path / "p").exists() or not dataset.shards(tmp_path / "p")

    # `fnattr show DIR`: the run's summary, then the first --limit examples
    shown = fnattr_run("show", "o", "--limit", "1", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "3 examples in 2 shards" in shown.stdout and "id 'a'" in shown.stdout
    assert "id 'c'" not in shown.stdout  # --limit 1


def test_show_dir_refuses_html_and_png(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["show", str(tmp_path / "o"), "--html", str(tmp_path / "a.html")])
    assert exit_.value.code == 2 and "pass one of its shards" in capsys.readouterr().err


def test_a_type_check_failure_is_one_line(monkeypatch, capsys, tmp_path):
    from jaxtyping import Float
    from torch import Tensor

    from fnattr._check import typechecked

    @typechecked
    def method(x: Float[Tensor, "a b"], n: int) -> None:
        """A method whose runtime check fails."""

    def fail(args, rest):
        method(torch.zeros(2, 2), "three")
    monkeypatch.setattr(cli, "cmd_methods", fail)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), fail))
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "parameter 'n'" in err and "'three'" in err and "--debug" in err


def _with_run(parser, run):
    parser.set_defaults(run=run)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(run=run)
    return parser


def test_a_model_folders_code_runs_only_with_trust_remote_code(evil_folders, tmp_path):  # noqa: F811
    from tests.test_cli import ROOT

    folder, marker = evil_folders["config"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = [sys.executable, "-m", "fnattr", "attribute", "Hi", "--model", str(folder), "--no-save",
            "--method", "saliency", "--max-new-tokens", "1", "--quiet"]
    refused = subprocess.run(args, input="y\n" * 10, capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=300)
    assert refused.returncode == 1 and not marker.exists()
    assert len(refused.stderr.strip().splitlines()) == 1 and "--trust-remote-code" in refused.stderr
    subprocess.run([*args, "--trust-remote-code"], capture_output=True, text=True, cwd=tmp_path,
                   env=env, timeout=300)
    assert marker.exists()  # the opt-in runs it


def test_source_and_generation_flags_reach_prepare(chat_dir, tmp_path):
    run = fnattr_run("attribute", "The cat sat", "--model", chat_dir, "--method", "saliency",
                     "--target", " on", "--generate-from-target-prefix", "--max-new-tokens", "2",
                     "--skip-special-tokens", "--save", "s.safetensors", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = load(tmp_path / "s.safetensors")
    model, tok = load_model(chat_dir)
    batch = prepare(model, tok, ["The cat sat"], [" on"], max_new_tokens=2, skip_special_tokens=True,
                    generate_from_target_prefix=True)
    assert out.source_tokens == batch.source_tokens and "<s>" not in out.source_tokens[0]
    assert out.target_tokens == batch.target_tokens and len(batch.target_tokens[0]) > 1
    torch.testing.assert_close(out.source, saliency(model, batch).source)


def test_contrast_force_inputs_equals_the_api(chat_dir, tmp_path, monkeypatch):
    import fnattr

    monkeypatch.chdir(tmp_path)
    args = ["attribute", "The cat sat", "--model", chat_dir, "--method", "saliency", "--target",
            " on the mat", "--target-fn", "contrast_prob_diff", "--contrast-target", " in the park",
            "--save", "f.safetensors", "--quiet", "--no-table"]
    assert cli.main([*args, "--contrast-force-inputs", "--contrast-context", "own"]) == 0
    model, tok = load_model(chat_dir)
    ref = fnattr.attribute(model, tok, ["The cat sat"], [" on the mat"], method="saliency",
                           target_fn="contrast_prob_diff", contrast_targets=[" in the park"],
                           contrast_force_inputs=True, contrast_context="own")
    out = load(tmp_path / "f.safetensors")
    assert out.target_tokens == ref.target_tokens != [[" on", " the", " mat"]]
    torch.testing.assert_close(out.source, ref.source)


@pytest.mark.parametrize("args, message", [
    (["--contrast-force-inputs"], "--contrast-force-inputs attributes on the contrastive inputs"),
    (["--contrast-force-inputs", "--target-fn", "contrast_prob", "--contrast-target", " A"],
     "add --contrast-context own"),
    (["--generate-from-target-prefix"], "--generate-from-target-prefix continues each --target"),
])
def test_source_flag_errors_before_loading(args, message, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["attribute", "The cat", "--no-save", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-worker", "1"], "size Ray workers: add --workers N"),
    (["--workers", "0"], "--workers 0: it must be at least 1"),
    (["--device-map", "[1, 2]"], "--device-map '[1, 2]'"),
])
def test_dataset_ray_and_device_flags_fail_before_loading(args, message, tmp_path, monkeypatch, capsys,
                                                         no_model):
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "d.jsonl", [{"q": "The cat"}])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["attribute-dataset", "--input", "d.jsonl", "--text-field", "q", "--out", "o", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err

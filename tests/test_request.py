"""Issue 24.3: a result records what it was asked (meta["request"]); rebuilt from that alone, the
call gives the same tensors; `fnattr show FILE` prints it."""

import json

import pytest
import torch

import fnattr
from fnattr import cli, request
from fnattr.result import load
from tests.conftest import _get


def _same(a, b):
    for x, y in [(a.source, b.source), (a.target, b.target), (a.delta, b.delta), (a.steps, b.steps),
                 *[(a.step_scores[k], b.step_scores[k]) for k in a.step_scores]]:
        assert (x is None and y is None) or torch.equal(x, y)
    assert set(a.step_scores) == set(b.step_scores)


@pytest.mark.parametrize("case", ["contrast", "chat_generated"])
def test_rebuilt_from_the_saved_metadata_alone_gives_the_same_tensors(request_fixture, case, tmp_path):
    model, tok = request_fixture
    if case == "contrast":
        out = fnattr.attribute(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran"],
                               method="integrated_gradients", n_steps=3,
                               target_fn="contrast_prob_diff", contrast_targets=[" Rome.", " sat"],
                               step_scores=["entropy", "contrast_prob"])
    else:
        tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        out = fnattr.attribute(model, tok, "The cat sat", method="lime", n_samples=6, seed=3,
                               chat=True, system="Be brief.", max_new_tokens=2,
                               generate_kwargs={"do_sample": False})
    out.save(tmp_path / "r.safetensors")
    back = load(tmp_path / "r.safetensors")
    req = json.loads(back.meta["request"])
    assert req["model"]["class"] == type(model).__name__ and req["model"]["dtype"] == "float64"
    if case == "contrast":
        assert req["contrast_targets"] == [" Rome.", " sat"] and req["targets"] == [" Paris.", " ran"]
        assert torch.tensor(req["contrast_ids"]).shape == out.target_ids.shape
        assert req["method_args"] == {"n_steps": 3, "step_scores": ["entropy", "contrast_prob"]}
    else:
        assert req["chat"] is True and req["system"] == "Be brief." and req["method_args"]["seed"] == 3
    again = fnattr.api.rerun(model, tok, back)  # no argument but the model, tokenizer and the file
    _same(back, again)
    assert again.meta["request"] == back.meta["request"]


@pytest.fixture
def request_fixture(request):
    model, tok = _get(request, "gpt2")
    template = getattr(tok, "chat_template", None)
    yield model, tok
    tok.chat_template = template


def test_show_prints_what_was_asked(request_fixture, tmp_path, capsys):
    model, tok = request_fixture
    out = fnattr.attribute(model, tok, "The capital of France is", " Paris.", method="saliency",
                           target_fn="contrast_prob_diff", contrast_targets=" Rome.")
    out.save(tmp_path / "r.safetensors")
    assert cli.main(["show", str(tmp_path / "r.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert 'contrast_targets: [" Rome."]' in shown and "contrast_ids: " in shown
    assert 'targets: [" Paris."]' in shown and "versions: " in shown and "model: " in shown

"""Bad inputs, hostile files, untrusted code, global random state and threads (issue 12).

Each bad input gives one short line that names the problem, and leaves the model as it was."""

import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
import time
import types

import matplotlib.text
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

import fnattr
from fnattr import prepare, render
from fnattr.hooks import frozen
from fnattr.methods import (
    gradient_shap, layer_deeplift, layer_gradient_x_activation, layer_integrated_gradients, lime,
    saliency,
)
from tests.state import assert_unchanged, snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
LONG = "The cat sat on the mat. " * 20  # > 64 tokens: the tiny models have 64 positions
NAN, INF = float("nan"), float("inf")


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 400, text
    return text


# ---- bad inputs: one line, the model unchanged ------------------------------------------------

def _batch(model, tok):
    return prepare(model, tok, ["A dog"], [" ran in"])


BAD_INPUTS = {
    "prompt past the context": (lambda m, t: prepare(m, t, [LONG]), ValueError,
                                r"`sources\[0\]` is \d+ tokens but the model reads at most 64"),
    "lime kernel_width nan": (lambda m, t: lime(m, _batch(m, t), kernel_width=NAN, n_samples=4),
                              ValueError, "`kernel_width`=nan positive"),
    "lime kernel_width inf": (lambda m, t: lime(m, _batch(m, t), kernel_width=INF, n_samples=4),
                              ValueError, "`kernel_width`=inf"),
    "lime alpha nan": (lambda m, t: lime(m, _batch(m, t), alpha=NAN, n_samples=4),
                       ValueError, "`alpha`=nan"),
    "gradient_shap stdevs nan": (lambda m, t: gradient_shap(m, _batch(m, t), stdevs=NAN),
                                 ValueError, "`stdevs`=nan"),
    "gradient_shap stdevs inf": (lambda m, t: gradient_shap(m, _batch(m, t), stdevs=INF),
                                 ValueError, "`stdevs`=inf"),
}
LM_HEAD = {"layer_integrated_gradients": layer_integrated_gradients,
           "layer_gradient_x_activation": layer_gradient_x_activation,
           "layer_deeplift": layer_deeplift}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_leaves_the_model(decoder_model, case):
    model, tok = decoder_model
    call, kind, match = BAD_INPUTS[case]
    before = snapshot(model)
    with pytest.raises(kind, match=match) as caught:
        call(model, tok)
    _one_line(caught.value)
    assert_unchanged(model, before)


TYPES = {  # what a user sees; the suite's import hook answers these with beartype's own report
    "int source": ("5", "`sources` is int: pass a text (str) or a list of texts."),
    "dict source": ("{'A dog': 1}", "`sources` is dict: pass a text (str) or a list of texts."),
    "set source": ("{'A dog'}", "`sources` is set: pass a text (str) or a list of texts."),
    "int in sources": ("['A dog', 3]", "`sources[1]` is int, not str: pass texts."),
    "dict target": ("['A dog'], {' ran': 1}", "`targets` is dict: pass a text (str) or a list of texts."),
}


def test_sources_that_are_not_texts_are_refused_by_name(as_a_user):
    """As a user sees it (the suite's import hook checks `prepare`'s annotations before its own
    checks can speak)."""
    got = dict(line.split(" | ", 1) for line in as_a_user if " | " in line)
    assert got == {case: message for case, (_, message) in TYPES.items()}


@pytest.mark.parametrize("method", list(LM_HEAD))
def test_the_output_layer_is_refused_as_a_layer(gpt2, method):
    model, tok = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`layer`='lm_head' is the output layer.*'transformer\.h\.0'"
                       ) as caught:
        LM_HEAD[method](model, _batch(model, tok), layer="lm_head")
    _one_line(caught.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_context_is_checked_before_running_for_both_kinds(request, name):
    """The `IndexError: index out of range in self` of issue 12: refused or capped up front."""
    from tests.conftest import _get

    model, tok = _get(request, name)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model reads at most 64 positions") as caught:
        prepare(model, tok, [LONG], max_new_tokens=2)
    _one_line(caught.value)
    with pytest.warns(UserWarning, match="`max_new_tokens`=100000 does not fit"):
        batch = prepare(model, tok, ["A dog"], max_new_tokens=100_000)
    assert batch.target_ids.shape[1] <= 64
    assert_unchanged(model, before)


def test_prepare_generates_greedily_in_eval_mode_and_restores_training(gpt2):
    model, tok = gpt2
    assert model.config.resid_pdrop > 0  # dropout would change "greedy" tokens in training mode
    expected = prepare(model, tok, ["A dog", "The cat"], max_new_tokens=6).target_ids
    model.train()
    try:
        modes = {k: m.training for k, m in model.named_modules()}
        for _ in range(3):
            assert torch.equal(prepare(model, tok, ["A dog", "The cat"], max_new_tokens=6).target_ids,
                               expected)
        assert {k: m.training for k, m in model.named_modules()} == modes
    finally:
        model.eval()


# ---- hostile result files -------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(tensors, header) of a real result, to damage one field at a time."""
    from tests.conftest import _build, _tokenizer, _vocab

    tok = _tokenizer("<s> $A")
    model = _build("gpt2", _vocab(tok))
    out = saliency(model, prepare(model, tok, ["A dog", "The cat"], [" ran in the park", " sat"]))
    path = tmp_path_factory.mktemp("saved") / "r.safetensors"
    out.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _hostile(tensors, header, case):
    t, h = dict(tensors), dict(header)
    meta = json.loads(h["meta"])
    if case == "missing step_score_names":
        del h["step_score_names"]
    elif case == "meta is a list":
        h["meta"] = "[1, 2]"
    elif case == "meta value not a string":
        h["meta"] = json.dumps({**meta, "method": 3})
    elif case == "tokens of the wrong type":
        h["source_tokens"] = json.dumps([[1, 2, 3]] * 2)
    elif case == "fewer tokens than rows":
        h["source_tokens"] = json.dumps(json.loads(h["source_tokens"])[:1])
    elif case == "fewer tokens than columns":
        h["target_tokens"] = json.dumps([row[:-1] for row in json.loads(h["target_tokens"])])
    elif case == "deeply nested tokens":
        h["source_tokens"] = _deep(100_000)
    elif case == "deeply nested meta value":
        h["meta"] = json.dumps({**meta, "args": _deep(100_000)})
    elif case == "steps outside the targets":
        t["steps"] = t["steps"] + 10
    elif case == "float mask":
        t["source_mask"] = t["source_mask"].float()
    elif case == "float ids":
        t["target_ids"] = t["target_ids"].double()
    elif case == "1 MB title":
        h["meta"] = json.dumps({**meta, "method": "x" * 2**20})
    elif case == "token of 1 MB":
        rows = json.loads(h["target_tokens"])
        rows[0][0] = "y" * 2**20
        h["target_tokens"] = json.dumps(rows)
    elif case == "stray tensor":
        t["evil"] = torch.zeros(1)
    elif case == "step score without tensor":
        h["step_score_names"] = json.dumps(["probability", "missing"])
    elif case == "source of the wrong shape":
        t["source"] = t["source"][:, :, :-1].contiguous()
    elif case == "extra_dims not matching":
        h["extra_dims"] = "[]"
    return t, h


HOSTILE = {  # case -> what the error names
    "missing step_score_names": "header field 'step_score_names' is missing",
    "meta is a list": "header field 'meta' is not a JSON object of strings",
    "meta value not a string": "header field 'meta' is not a JSON object of strings",
    "tokens of the wrong type": "header field 'source_tokens' is not a list of lists of strings",
    "fewer tokens than rows": "header field 'source_tokens' does not match tensor 'source_ids'",
    "fewer tokens than columns": "header field 'target_tokens' does not match tensor 'target_ids'",
    "deeply nested tokens": "header field 'source_tokens' nests deeper than 32 levels",
    "deeply nested meta value": r"meta\['args'\] nests deeper than 32 levels",
    "steps outside the targets": r"tensor 'steps' holds \[\d+, .* outside the \d+ target positions",
    "float mask": "tensor 'source_mask' is float32, not bool",
    "float ids": "tensor 'target_ids' is float64, not integer",
    "1 MB title": r"meta\['method'\] has 1048576 characters, more than 1000",
    "token of 1 MB": "header field 'target_tokens' has a token of more than 10000 characters",
    "stray tensor": "tensor 'evil' is not part of a result",
    "step score without tensor": "step score 'missing' has no tensor 'step_scores.missing'",
    "source of the wrong shape": r"tensor 'source_ids' has shape \(2, 3\); 'source' .* implies \(2, 2\)",
    "extra_dims not matching": "header field 'extra_dims' names 0 dims; 'source' has 1",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_naming_the_file_and_the_field(saved, tmp_path, case):
    tensors, header = _hostile(*saved, case)
    path = tmp_path / f"{case.replace(' ', '-')}.safetensors"
    save_file(tensors, str(path), metadata=header)
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        fnattr.load(path)
    text = _one_line(caught.value)
    assert text.startswith(f"{str(path)!r} is damaged or not an fnattr result (")
    assert re.search(HOSTILE[case], text), text
    assert time.perf_counter() - start < 5
    if "meta" in case or "title" in case:
        with pytest.raises(ValueError, match=HOSTILE[case]):
            fnattr.result.load_meta(path)


def test_an_intact_file_still_loads(saved, tmp_path):
    save_file(saved[0], str(tmp_path / "ok.safetensors"), metadata=saved[1])
    out = fnattr.load(tmp_path / "ok.safetensors")
    assert out.source.shape[:2] == (2, out.target_ids.shape[1]) and out.meta["method"] == "saliency"
    assert out.source_tokens[1][-1] == " cat" and out.target_tokens[1][1:] == ("<pad>",) * (
        out.target_ids.shape[1] - 1)


# ---- NaN and infinite scores are drawn, and a NaN says so --------------------------------------

@pytest.fixture
def nan_result(saved, tmp_path):
    save_file(saved[0], str(tmp_path / "r.safetensors"), metadata=saved[1])
    out = fnattr.load(tmp_path / "r.safetensors")
    source = out.source.clone()
    source[0, 0, -1] = NAN  # row 0, step 0 reads its last prompt token: a broken model's NaN
    source[0, 1, -1] = INF
    return out.replace(source=source)


def test_nan_scores_are_labelled_apart_from_hidden_cells(nan_result, tmp_path):
    out = nan_result
    hm = render.heatmap(out)
    hide = render.hidden(out, hm)
    n_tgt = hm.values.shape[1]  # row 0's target tokens: a step does not see itself or later ones
    assert n_tgt >= 3 and hide.sum() == n_tgt * (n_tgt - 1) // 2 and not hide[: hm.n_source].any()
    n_src = hm.n_source
    assert math.isnan(hm.values[n_src - 1, 0]) and not hide[n_src - 1, 0]
    text = io.StringIO()
    render.console(out, file=text)
    console = text.getvalue()
    assert "NaN" in console and "1 cell NaN: not a number" in console and "inf" in console
    page = render.html(out)
    assert page.count(f': {render.NAN_TIP}">NaN</td>') == 1 and page.count(": not visible") == hide.sum()
    assert "1 cell NaN: not a number" in page
    colour = io.StringIO()
    Console(file=colour, force_terminal=True, width=300).print(render.table(hm, hide=hide))
    assert "NaN" in colour.getvalue()
    fig = render.figure(out)
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert texts.count("NaN") == 1 and any("1 cell NaN" in t for t in texts)
    render.save_png(out, tmp_path / "nan.png", dpi=40)
    assert (tmp_path / "nan.png").stat().st_size > 0


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_result_with_fewer_tokens_than_ids_is_refused(nan_result, side):
    tokens = getattr(nan_result, f"{side}_tokens")
    for bad in (tokens[:1], (tokens[0][:-1], tokens[1])):
        with pytest.raises(ValueError, match=rf"`{side}_tokens` has .* give one token per id") as caught:
            nan_result.replace(**{f"{side}_tokens": bad})
        _one_line(caught.value)


def test_a_long_title_does_not_stall_the_png(nan_result, tmp_path):
    out = nan_result.replace(meta={**nan_result.meta, "method": "m" * 1000, "baseline": "b" * 1000})
    start = time.perf_counter()
    render.save_png(out, tmp_path / "long.png", dpi=40)
    assert time.perf_counter() - start < 10


# ---- untrusted model code -------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import GPT2Config, GPT2LMHeadModel
class EvilConfig(GPT2Config):
    model_type = "fnattr_evil"
class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
"""


@pytest.fixture(scope="module")
def evil_folders(tmp_path_factory):
    """A tiny GPT2 folder whose config maps to its own module (a marker file when it runs), and
    one whose tokenizer config does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import _tokenizer

    root = tmp_path_factory.mktemp("evil")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    folders = {}
    for kind in ("config", "tokenizer"):
        folder = root / kind
        model.save_pretrained(folder)
        _tokenizer("<s> $A").save_pretrained(folder)
        marker = root / f"{kind}.ran"
        (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
        name = "config.json" if kind == "config" else "tokenizer_config.json"
        cfg = json.loads((folder / name).read_text())
        if kind == "config":
            cfg |= {"model_type": "fnattr_evil",
                    "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
        else:
            cfg |= {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
        (folder / name).write_text(json.dumps(cfg))
        folders[kind] = (folder, marker)
    return folders


LOAD_CHILD = """
import sys
from fnattr.loading import load_model
for folder in sys.argv[1:]:
    try:
        load_model(folder)
        print("LOADED", folder)
    except Exception as error:
        print("REFUSED |", type(error).__name__, str(error).splitlines()[-1] if str(error) else "")
"""


def test_a_folders_own_code_never_runs_even_with_yes_on_stdin(evil_folders, tmp_path):
    """`echo y | fnattr attribute Hi --model ./folder` ran the folder's code: no longer."""
    folders = [str(evil_folders[kind][0]) for kind in ("config", "tokenizer")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", LOAD_CHILD, *folders], input="y\n" * 10,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind, (_, marker) in evil_folders.items():
        assert not marker.exists(), f"the {kind} folder's code ran"
    first = done.stdout.splitlines()[0]
    assert first.startswith("REFUSED | ValueError name_or_path=") and "own Python code" in first
    assert "trust_remote_code=True" in first, done.stdout


# ---- global random state --------------------------------------------------------------------

USER_CHILD = textwrap.dedent("""
    import random, sys, warnings
    import numpy, torch
    warnings.simplefilter("ignore")
    from tests.conftest import _build, _tokenizer, _vocab
    from fnattr import prepare
    from fnattr.methods import METHODS

    tok = _tokenizer("<s> $A")
    model = _build("gpt2", _vocab(tok))
    for case, args in {cases!r}.items():
        try:
            prepare(model, tok, *eval(args + ","))
            print(case, "| ACCEPTED")
        except TypeError as error:
            print(case, "|", str(error))

    FAST = {{"lime": {{"n_samples": 4}}, "gradient_shap": {{"n_samples": 2}},
            "reagent": {{"max_probe_steps": 2, "num_probes": 2}}, "integrated_gradients": {{"n_steps": 2}},
            "sequential_integrated_gradients": {{"n_steps": 2}}, "layer_integrated_gradients": {{"n_steps": 2}},
            "discretized_integrated_gradients": {{"n_steps": 2, "n_neighbors": 4}}}}

    def draws():
        return random.random(), float(numpy.random.rand()), float(torch.rand(1))

    def seed():
        random.seed(7); numpy.random.seed(7); torch.manual_seed(7)

    batch = prepare(model, tok, ["A dog", "The cat"], [" ran in", " sat"])
    seed(); expected = draws()
    for method, fn in METHODS.items():
        seed()
        fn(model, batch, **FAST.get(method, {{}}))
        got = draws()
        print("method", method, "same" if got == expected else f"CHANGED {{got}} != {{expected}}")
""")


@pytest.fixture(scope="module")
def as_a_user() -> list[str]:
    """The output lines of `USER_CHILD`, run as a user runs fnattr: in a fresh interpreter,
    without the suite's import hook (which type-checks every function of fnattr, not only
    those fnattr checks itself)."""
    code = USER_CHILD.format(cases={k: v[0] for k, v in TYPES.items()})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_every_method_leaves_the_global_generators_as_they_were(as_a_user):
    """`random`, `numpy.random` and torch's generator draw the same after any method."""
    lines = [line for line in as_a_user if line.startswith("method ")]
    assert len(lines) == len(fnattr.methods.METHODS), as_a_user
    changed = [line for line in lines if not line.endswith(" same")]
    assert not changed, changed


def test_lime_without_a_seed_leaves_torch_generator_and_differs_per_call(gpt2):
    model, tok = gpt2
    batch = _batch(model, tok)
    torch.manual_seed(3)
    a = lime(model, batch, n_samples=4)
    b = lime(model, batch, n_samples=4)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))
    assert json.loads(a.meta["args"])["seed"] != json.loads(b.meta["args"])["seed"]


def test_typechecked_functions_leave_random_as_it_was():
    import random

    from fnattr._check import typechecked

    @typechecked
    def count(items: list[str], table: dict[str, int]) -> tuple[int, ...]:
        return (len(items), len(table))

    random.seed(5)
    expected = random.random()
    random.seed(5)
    for _ in range(10):
        count(["a", "b", "c"], {"x": 1, "y": 2})
    assert random.random() == expected


# ---- threads and interrupts -----------------------------------------------------------------

def test_two_threads_with_one_model_take_turns(gpt2):
    model, tok = gpt2
    batch = _batch(model, tok)
    before = snapshot(model)
    alone = saliency(model, batch)
    inside, order, results, errors = threading.Event(), [], {}, []

    def slow(logits, target_ids):  # the first thread lingers inside its attribution
        order.append(("first", "in"))
        inside.set()
        time.sleep(0.3)
        order.append(("first", "out"))
        return fnattr.targets.probability(logits, target_ids)

    def second(logits, target_ids):
        order.append(("second", "in"))
        return fnattr.targets.probability(logits, target_ids)

    def run(name, fn):
        try:
            results[name] = saliency(model, batch, fn)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=run, args=("first", slow))
    first.start()
    assert inside.wait(30)
    other = threading.Thread(target=run, args=("second", second))
    other.start()
    first.join(60)
    other.join(60)
    assert not errors, errors
    assert order.index(("second", "in")) > order.index(("first", "out"))  # it waited its turn
    assert_unchanged(model, before)  # requires_grad and modes as they were
    for out in results.values():
        assert torch.equal(out.source, alone.source)


class _Flaky(nn.Module):
    """A module whose `training` flag raises KeyboardInterrupt the first time it is set back to
    True after being armed: Ctrl-C landing in the middle of `frozen`'s restore."""

    armed = False

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    @property
    def training(self) -> bool:
        return self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        if mode and _Flaky.armed:
            _Flaky.armed = False
            raise KeyboardInterrupt
        self.__dict__["_training"] = mode


def test_an_interrupt_during_the_restore_still_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), _Flaky(), nn.Dropout(0.1), nn.Linear(2, 2))
    model.config = types.SimpleNamespace()  # for `snapshot`
    model.train()
    model[0].weight.requires_grad_(False)  # a mix of flags, all to be restored
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt), frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        _Flaky.armed = True
    assert not _Flaky.armed  # the interrupt did land inside the restore
    assert_unchanged(model, before)
    with frozen(model):  # and the model's lock was released
        pass


def test_an_interrupt_inside_the_body_restores_and_releases_the_lock(gpt2):
    model, _ = gpt2
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt), frozen(model):
        raise KeyboardInterrupt
    assert_unchanged(model, before)
    done = []

    def enter():
        with frozen(model) as held:
            done.append(held is model)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(10)
    assert done == [True]

"""The command line answers at once: `--help`, `--version`, `fnattr methods` and argument errors
import no torch. Its tables and method signatures, read from fnattr's source files, match the
modules; its defaults match the Python API's."""

import importlib
import inspect
import os
import pathlib
import subprocess
import sys
import time

import pytest

from fnattr import cli
from fnattr.cli import catalog as _cli_catalog

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "matplotlib", "rich")


def run(*args: str, cwd) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("argv, code, out, err", [
    (["--help"], 0, "attribute", ""),
    (["--version"], 0, "fnattr ", ""),
    (["attribute", "--help"], 0, "--contrast-target", ""),
    (["methods", "occlusion"], 0, "window: int = 1", ""),
    (["attribute", "--method", "help"], 0, "stride: int = 1", ""),
    (["attribute", "Hi", "--method", "integrated_gradient"], 2, "", "'integrated_gradient' is unknown"),
    (["attribute", "Hi", "--arg", "n_steps=abc"], 2, "", "--arg n_steps='abc'"),
    (["attribute", "Hi", "--target", "A", "B"], 2, "", "2 --target for 1 texts"),
    (["evaluate", "--methods", "saliency,nope", "--input", "x.jsonl"], 2, "", "'nope' unknown"),
])
def test_python_dash_m_fnattr_answers_fast(argv, code, out, err, tmp_path):
    done, seconds = run("-m", "fnattr", *argv, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert out in done.stdout and err in done.stderr and "Traceback" not in done.stderr
    assert seconds < 2, f"`python -m fnattr {' '.join(argv)}` took {seconds:.1f} s"


def test_no_torch_before_the_model_is_needed(tmp_path):
    code = (
        "import sys\n"
        "from fnattr import cli\n"
        f"heavy = {HEAVY!r}\n"
        "seen = [m for m in heavy if m in sys.modules]\n"
        "for argv in (['--help'], ['methods'], ['attribute', '--method', 'help'],\n"
        "             ['attribute', 'Hi', '--arg', 'tolerance=x'],\n"
        "             ['attribute', 'Hi', '--target-fn', 'x']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    seen += [f'{argv}: {m}' for m in heavy if m in sys.modules]\n"
        "print(seen)\n"
    )
    done, _ = run("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"fnattr {version('fnattr')}\n"


@pytest.mark.parametrize("module, name", [
    ("fnattr.methods", "METHODS"), ("fnattr.targets", "TARGETS"), ("fnattr.targets", "CONTRAST_TARGETS"),
    ("fnattr.targets", "MODEL_TARGETS"), ("fnattr.aggregate", "REDUCERS"), ("fnattr.evaluate", "FRACTIONS"),
    ("fnattr.evaluate", "METRICS"), ("fnattr.evaluate", "REMOVALS"), ("fnattr.loading", "_DTYPES"),
    ("fnattr.groups", "SPLITTERS"),
])
def test_tables_read_from_source_match_the_modules(module, name):
    assert cli.table_names(module, name) == tuple(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("name", cli.method_names())
def test_signatures_read_from_source_match_inspect(name):
    """The source reader follows fnattr's aliases (`Baseline`, `Fill`, `_converge.TOLERANCE`, ...)
    to the same options, JSON types, defaults and summary as the imported function."""
    static, runtime = _cli_catalog._static_info(name), _cli_catalog._runtime_info(name)
    assert [o.name for o in static.options] == [o.name for o in runtime.options]
    for s, r in zip(static.options, runtime.options):
        assert cli.spec_text(cli.json_part(s.spec)) == cli.spec_text(cli.json_part(r.spec)), s.name
        assert repr(s.default) == repr(r.default), s.name
    assert static.summary == runtime.summary and static.more == runtime.more


def test_methods_lists_every_method_option_and_default(capsys):
    from fnattr.methods import METHODS

    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    blocks = {}
    for line in text.split("\n\n")[0].splitlines():
        if not line.startswith(" "):
            name = line.split(" - ")[0]
            blocks[name] = []
        elif line.startswith("    "):
            blocks[name].append(line.strip())
    assert list(blocks) == list(METHODS)
    for name, fn in METHODS.items():
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in (*cli.COMMON, *cli.FIXED):
                line = next(x for x in blocks[name] if x.startswith(f"{p.name}: "))
                assert line.endswith(f" = {p.default!r}"), line
    common = " ".join(text.split("\n\n")[1].split())
    assert all(f"{c}: " in common for c in cli.COMMON) and "contrast_prob_diff" in common
    for argv in (["attribute", "--method", "help"], ["evaluate", "--methods", "help"]):
        with pytest.raises(SystemExit) as info:  # like --help: before the required arguments
            cli.main(argv)
        assert info.value.code == 0 and capsys.readouterr().out == text


def test_methods_rejects_an_unknown_name(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["methods", "saliency", "nope"])
    assert info.value.code == 2 and "'nope' is not a method" in capsys.readouterr().err


def test_command_line_defaults_are_the_apis():
    from fnattr import compare, dataset, defaults, evaluate
    from fnattr.api import attribute
    from fnattr.loading import load_model
    from fnattr.targets import TARGETS

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    parser = cli.build_parser()
    att = parser.parse_args(["attribute", "Hi"])
    assert (att.method, att.target_fn, att.max_new_tokens) == (
        default(attribute, "method"), default(attribute, "target_fn"), default(attribute, "max_new_tokens"))
    assert (att.device, att.dtype) == (default(load_model, "device"), default(load_model, "dtype"))
    ds = parser.parse_args(["attribute-dataset", "--input", "x", "--text-field", "t", "--out", "o"])
    assert ds.batch_size == default(dataset.run, "batch_size")
    assert ds.max_new_tokens == default(dataset.run, "max_new_tokens") == defaults.MAX_NEW_TOKENS
    assert TARGETS[ds.target_fn] is default(dataset.run, "target_fn")
    ev = parser.parse_args(["evaluate", "--methods", "saliency", "--input", "x"])
    assert (ev.target_fn, ev.max_new_tokens, ev.n_boot, ev.seed) == tuple(
        default(compare.compare_methods, n) for n in ("target_fn", "max_new_tokens", "n_boot", "seed"))
    assert tuple(float(q) for q in ev.fractions.split(",")) == default(evaluate.faithfulness, "fractions")
    for flag in ("curve_levels", "removal", "n_random"):
        assert getattr(ev, flag) == default(evaluate.faithfulness, flag), flag
    assert ev.rank_by == evaluate.METRICS[0]


def test_value_specs_and_conversions():
    spec = _cli_catalog._union(("type", "int"), ("lit", "auto"))
    assert cli.spec_text(spec) == "int | 'auto'"
    assert [cli.coerce(spec, v) for v in (3, "auto")] == [3, "auto"]
    assert all(cli.coerce(spec, v) is _cli_catalog._NO for v in ("abc", 1.5, True, None, [3]))
    assert cli.coerce(("type", "float"), 2) == 2.0 and cli.coerce(("type", "float"), True) is _cli_catalog._NO
    assert cli.coerce(("lit", 1), True) is _cli_catalog._NO
    heads = ("dict", ("type", "int"), ("list", ("type", "int")))
    assert cli.coerce(heads, {"3": [1]}) == {3: [1]} and cli.coerce(heads, {"x": [1]}) is _cli_catalog._NO
    py = _cli_catalog._union(("py", "torch.Generator"), _cli_catalog._NONE)
    assert cli.spec_text(py) == "torch.Generator | None" and cli.json_part(py) == _cli_catalog._NONE

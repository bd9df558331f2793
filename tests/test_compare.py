"""`fnattr.compare` and `fnattr evaluate` on the tiny gpt2 of conftest."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from fnattr import cli, compare, evaluate, prepare
from fnattr.evaluate import compare_result as _compare_result
from fnattr.compare import Comparison, bootstrap, compare_methods, plot_curves, table
from fnattr.evaluate import HIGHER_IS_BETTER, faithfulness
from fnattr.loading import load_model
from fnattr.methods import METHODS
from fnattr.targets import probability
from tests.conftest import _get

EXAMPLES = [("The cat sat", " on the"), ("Rome is", " a city in"), ("A dog ran in the", " park.")]
NAMES = ("saliency", "integrated_gradients", "occlusion")
OPTIONS = {"integrated_gradients": {"n_steps": 8}, "occlusion": {"internal_batch_size": 4}}
FAITH = {"fractions": (0.2, 0.5), "curve_levels": 4, "n_random": 3}
SEED, N_BOOT = 1, 200


@pytest.fixture(scope="module")
def run(request):
    model, tok = _get(request, "gpt2")
    comp = compare_methods(model, tok, EXAMPLES, NAMES, method_options=OPTIONS, n_boot=N_BOOT,
                           seed=SEED, **FAITH)
    return model, tok, comp


def test_per_example_values_are_faithfulness_per_example(run):
    model, tok, comp = run
    batch = prepare(model, tok, [s for s, _ in EXAMPLES], [t for _, t in EXAMPLES])
    assert comp.methods == NAMES and comp.metrics == evaluate.METRICS and comp.ids == (0, 1, 2)
    assert comp.sources == batch.sources and comp.targets == batch.targets
    for name in NAMES:
        out = METHODS[name](model, batch, probability, **OPTIONS.get(name, {}))
        faith = faithfulness(model, batch, out, probability, seed=SEED, **FAITH)
        for k in evaluate.METRICS:
            assert torch.equal(comp.per_example[name][k], faith.per_example(k))
            assert torch.equal(comp.chance_per_example[name][k], faith.per_example(k, random=True).mean(0))
            assert torch.equal(getattr(comp.results[name], k), getattr(faith, k))
            assert comp.estimates[name][k].mean == pytest.approx(float(faith.per_example(k).mean()))


def test_one_batch_for_every_method(gpt2, monkeypatch):
    model, tok = gpt2
    prepared, seen = [], []
    real = compare.prepare
    monkeypatch.setattr(compare, "prepare", lambda *a, **kw: prepared.append(1) or real(*a, **kw))

    def spy(method):
        def fn(model, batch, target_fn, **options):
            seen.append(batch)
            return method(model, batch, target_fn, **options)
        fn.__name__ = f"spy_{method.__name__}"
        return fn

    comp = compare_methods(model, tok, ["The cat sat", "Rome is"], [spy(METHODS[n]) for n in NAMES[::2]],
                           max_new_tokens=2, n_boot=10, fractions=(0.5,), curve_levels=2, n_random=1)
    assert prepared == [1] and len(seen) == 2 and seen[0] is seen[1]
    assert comp.methods == ("spy_saliency", "spy_occlusion") and comp.meta["targets"].startswith("generated")
    assert all(len(t) for t in comp.targets)
    # a prepared batch is used as it is
    batch = seen[0]
    again = compare_methods(model, None, batch, [spy(METHODS[n]) for n in NAMES[::2]], n_boot=10,
                            fractions=(0.5,), curve_levels=2, n_random=1)
    assert prepared == [1] and seen[2] is batch and again.meta["targets"] == "from the batch"
    assert again.estimates == comp.estimates and again.targets == comp.targets


def test_bootstrap_interval_contains_mean_and_is_seeded(run):
    comp = run[2]
    state = torch.get_rng_state()
    for name in NAMES:
        for k in evaluate.METRICS:
            est = comp.estimates[name][k]
            assert est.low <= est.mean <= est.high
            assert bootstrap(comp.per_example[name][k], n_boot=N_BOOT, seed=SEED) == est
            chance = comp.chance[name][k]
            assert chance.low <= chance.mean <= chance.high
    assert torch.equal(torch.get_rng_state(), state)  # local generators only
    values = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4], dtype=torch.float64)
    assert bootstrap(values, seed=3) == bootstrap(values, seed=3) != bootstrap(values, seed=4)
    one = bootstrap(values, n_boot=5000, seed=0)
    assert one.low < one.mean < one.high and one.mean == pytest.approx(0.42)
    assert bootstrap(torch.full((4,), 0.3, dtype=torch.float64), n_boot=50) == compare.Estimate(0.3, 0.3, 0.3)


def test_ranking_follows_means_and_direction(run):
    comp = run[2]
    for k in comp.metrics:
        means = [comp.estimates[m][k].mean for m in comp.ranking[k]]
        assert sorted(comp.ranking[k]) == sorted(NAMES)
        assert means == sorted(means, reverse=HIGHER_IS_BETTER[k])
    # the direction: the same per-example numbers, ranked as a higher- and a lower-is-better metric
    values = {"a": 0.3, "b": 0.1, "c": 0.2}
    assert _compare_result._order(list(values), values, True) == ("a", "c", "b")
    assert _compare_result._order(list(values), values, False) == ("b", "c", "a")
    # the table lists the methods in the ranking of the metric it is ranked by
    for by in ("comprehensiveness", "sufficiency"):
        text = _render(comp, by=by)
        rows = [line for line in text.splitlines()
                if line.startswith("│") and any(f" {m} " in line for m in NAMES)]
        assert [next(m for m in NAMES if f" {m} " in r) for r in rows] == list(comp.ranking[by])


def _render(comp: Comparison, **options) -> str:
    buf = io.StringIO()
    Console(file=buf, width=300).print(table(comp, **options))
    return buf.getvalue()


def test_table_caption_says_what_the_numbers_are(run):
    comp = run[2]
    est = comp.estimates[comp.ranking["deletion"][0]]["deletion"]
    # text from the model or tokenizer is data, never rich markup
    odd = dataclasses.replace(comp, meta={**comp.meta, "removal": "unk token '[/INST]' [bold]x"})
    text = _render(odd, by="deletion")
    for words in ("ranked by deletion", "fractions 0.2, 0.5) for comprehensiveness and sufficiency",
                  "AUC over 5 levels (0 to 1) of the deletion and insertion curves", "mean over 3 examples",
                  "95% percentile bootstrap interval, 200 resamples, seed 1", "target: probability",
                  "targets forced", "removal: unk token '[/INST]' [bold]x", "saliency l2",
                  "↑ higher is better: comprehensiveness, insertion",
                  "↓ lower is better: sufficiency, deletion", "chance", "3 random rankings",
                  f"{est.mean:.3g} [{est.low:.3g}, {est.high:.3g}]"):
        assert words in text, words
    with pytest.raises(ValueError, match="rank by one of"):
        table(comp, by="aopc")


def test_save_load_round_trip(run, tmp_path):
    comp = run[2]
    paths = comp.save(tmp_path / "out")
    assert [p.name for p in paths] == ["per_example.jsonl", *(f"{m}.faithfulness.safetensors" for m in NAMES)]
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert len(rows) == len(EXAMPLES) * len(NAMES)
    for row in rows:
        i, m = row["id"], row["method"]
        assert (row["source"], row["target"]) == (comp.sources[i], comp.targets[i])
        assert row["steps"] == int(comp.results[m].step_mask[i].sum())
        for k in evaluate.METRICS:  # JSON floats round-trip exactly
            assert row[k] == float(comp.per_example[m][k][i])
            assert row[f"random_{k}"] == float(comp.chance_per_example[m][k][i])
    for m, path in zip(NAMES, paths[1:]):
        faith = evaluate.load(path)
        for field in ("score", "step_mask", "deletion", "random_insertion", "comprehensiveness"):
            assert torch.equal(getattr(faith, field), getattr(comp.results[m], field))
    back = compare.load(tmp_path / "out")
    assert (back.methods, back.ids, back.sources, back.targets) == (comp.methods, comp.ids, comp.sources, comp.targets)
    assert back.estimates == comp.estimates and back.chance == comp.chance and back.ranking == comp.ranking
    assert back.meta == comp.meta and back.results["occlusion"].meta == comp.results["occlusion"].meta


def test_refuses_to_overwrite(run, tmp_path, monkeypatch):
    model, tok, comp = run
    existing = tmp_path / "occlusion.faithfulness.safetensors"
    existing.write_bytes(b"keep")
    monkeypatch.setattr(compare, "prepare", lambda *a, **kw: pytest.fail("prepared a batch"))
    with pytest.raises(FileExistsError, match="occlusion.faithfulness.safetensors.*overwrite=True"):
        compare_methods(model, tok, EXAMPLES, NAMES, out_dir=tmp_path)  # checked before it runs
    with pytest.raises(FileExistsError, match="occlusion.faithfulness.safetensors.*overwrite=True"):
        comp.save(tmp_path)
    assert existing.read_bytes() == b"keep" and sorted(os.listdir(tmp_path)) == [existing.name]  # nothing written
    comp.save(tmp_path, overwrite=True)
    assert evaluate.load(existing).meta["method"] == "occlusion"
    png = tmp_path / "c.png"
    png.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="c.png.*overwrite=True"):
        plot_curves(comp, png)
    assert png.read_bytes() == b"keep"


def test_plot_curves_writes_literal_text(run, tmp_path):
    comp = run[2]
    literal = r"p $\frac{1}{$ [/INST] x^2"  # invalid mathtext: drawing it as math would raise
    odd = dataclasses.replace(comp, meta={**comp.meta, "target_fn": literal})
    fig = plot_curves(odd, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    from matplotlib.text import Text
    texts = [t for t in fig.findobj(Text) if t.get_text()]
    assert texts and all(not t.get_parse_math() and not t.get_usetex() for t in texts)
    left, right = fig.axes
    assert left.get_ylabel().startswith(literal) and left.get_title().startswith("deletion (lower")
    assert right.get_title().startswith("insertion (higher")
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert labels[:3] == [f"{m} (AUC {comp.estimates[m]['deletion'].mean:.3g})" for m in NAMES]
    assert labels[3] == "random ranking" and len(left.get_lines()) == 4
    assert left.get_lines()[3].get_linestyle() == "--"
    torch.testing.assert_close(torch.as_tensor(left.get_lines()[0].get_ydata()), comp.curve("saliency", "deletion"))
    # the mean curve's area is the mean of the per-example areas
    auc = torch.trapezoid(comp.curve("occlusion", "insertion"), comp.results["occlusion"].levels)
    assert float(auc) == pytest.approx(comp.estimates["occlusion"]["insertion"].mean)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"methods": ["saliency", "nope"]}, ValueError, "'nope' is unknown"),
    ({"methods": ["saliency", "saliency"]}, ValueError, "given twice"),
    ({"method_options": {"saliency": {"n_steps": 3}}}, ValueError, "has no option 'n_steps'"),
    ({"method_options": {"occlusion": {}}}, ValueError, "not among the methods"),
    ({"examples": [("a b", " c"), "d e"]}, ValueError, "1 of 2 examples have a target"),
    ({"fractions": (0.2, 2)}, ValueError, "fractions"),
    ({"ranking": "global"}, ValueError, "ranking"),
    ({"n_steps": 3}, ValueError, "unknown option 'n_steps'"),
    ({"n_boot": 0}, ValueError, "n_boot"),
    ({"target_fn": "probabilty"}, ValueError, "is unknown"),
])
def test_checks_before_anything_runs(kwargs, error, message, gpt2, monkeypatch):
    monkeypatch.setattr(compare, "prepare", lambda *a, **kw: pytest.fail("prepared a batch"))
    args = {"examples": ["The cat sat"], "methods": ["saliency"], **kwargs}
    with pytest.raises(error, match=message):
        compare_methods(*gpt2, **args)


# ---- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, request):
    model, tok = _get(request, "gpt2")
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _data(folder) -> str:
    lines = [json.dumps({"text": s, "target": t, "other": 1}) for s, t in EXAMPLES]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return "data.jsonl"


@pytest.mark.parametrize("argv, status, message", [
    (["--methods", "saliency,nope"], 2, "'nope' unknown"),
    (["--methods", "saliency", "--input", "missing.jsonl"], 1, "--input 'missing.jsonl' does not exist"),
    (["--methods", "saliency", "--source-field", "question"], 1, "--text-field 'question' is not a field"),
    (["--methods", "saliency", "--text-field", "question"], 1, "--text-field 'question' is not a field"),
    (["--methods", "occlusion", "--arg", "occlusion.window=-1"], 2, "window=-1 is out of range"),
    (["--methods", "saliency", "--target-field", "answer"], 1, "--target-field 'answer' is not a field"),
    (["--methods", "saliency", "--arg", "n_steps=4"], 2, "is not method.key=value"),
    (["--methods", "saliency", "--arg", "occlusion.window=2"], 2, "which --methods does not list"),
    (["--methods", "saliency", "--arg", "saliency.n_steps=4"], 2, "has no option 'n_steps'"),
    (["--methods", "saliency", "--fractions", "0.1,x"], 2, "--fractions '0.1,x'"),
    (["--methods", "saliency", "--removal", "blank"], 2, "--removal 'blank' is unknown"),
    (["--methods", "saliency", "--png", "curves.svg"], 2, "name a .png file"),
    (["--methods", "saliency", "--out", "taken"], 1, "per_example.jsonl' exists: pass overwrite=True (--overwrite)"),
    (["--methods", "saliency", "--png", "old.png"], 1, "old.png' exists"),
])
def test_cli_fails_fast_without_loading_a_model(argv, status, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(cli, "load", lambda *a, **kw: calls.append(a))  # must never be called
    _data(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "per_example.jsonl").write_text("")
    (tmp_path / "old.png").write_bytes(b"")
    argv = ["evaluate", "--input", "data.jsonl", "--model", "./never/loaded", *argv]
    start = time.perf_counter()
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert time.perf_counter() - start < 0.5 and calls == []
    err = capsys.readouterr().err
    assert code == status and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_end_to_end(model_dir, tmp_path):
    _data(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    argv = ["evaluate", "--methods", ",".join(NAMES), "--input", "data.jsonl", "--source-field", "text",
            "--target-field", "target", "--model", model_dir, "--out", "res", "--png", "curves.png",
            "--arg", "integrated_gradients.n_steps=8", "--fractions", "0.2,0.5", "--curve-levels", "4",
            "--n-random", "3", "--n-boot", "200", "--seed", "1"]
    run = subprocess.run([sys.executable, "-m", "fnattr.cli", *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "faithfulness of 3 methods, ranked by comprehensiveness" in run.stdout
    assert all(m in run.stdout for m in NAMES) and "chance" in run.stdout
    for m in NAMES:
        assert f"attributing with {m}" in run.stderr
    assert f"scoring {', '.join(NAMES)}: done" in run.stderr  # all methods in shared forwards
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (tmp_path / "res" / "per_example.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["method"] for r in rows} == set(NAMES)
    # the command line passes everything through: the same numbers as the Python API
    model, tok = load_model(model_dir)
    ref = compare_methods(model, tok, EXAMPLES, NAMES, method_options={"integrated_gradients": {"n_steps": 8}},
                          n_boot=200, seed=1, **FAITH)
    saved = compare.load(tmp_path / "res")
    assert saved.ranking == ref.ranking and saved.estimates == ref.estimates
    for m in NAMES:
        assert torch.equal(evaluate.load(tmp_path / "res" / f"{m}.faithfulness.safetensors").deletion,
                           ref.results[m].deletion)

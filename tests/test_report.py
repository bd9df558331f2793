"""fnattr.report: the data a report embeds, its escaping, the three kinds of input and the CLI.
(The page itself, in a browser: tests/test_report_browser.py.)"""

import base64
import json
import math
import re
import zlib

import pytest
import torch

import fnattr.report
from fnattr import dataset, views
from fnattr.cli import main
from fnattr.report import build
from fnattr.result import AttributionTensors

HOSTILE_SRC = ("</script><script>alert(1)</script>", "<!--", "\u2028x\u2029", "<b>bold</b>")
HOSTILE_TGT = ("\x1b[2J\x1b[31mred", "\u202eevil\u202c", "[bold]y[/bold] &amp;", "\n")


def result(n_src=3, n_tgt=3, *, batch=1, hidden=2, seed=0, src_tokens=None, tgt_tokens=None,
           meta=None, delta=None) -> AttributionTensors:
    """Random scores with hidden dims and a target side (later target tokens exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, n_tgt, n_src, hidden, dtype=torch.float64, generator=gen)
    target = torch.randn(batch, n_tgt, n_tgt, hidden, dtype=torch.float64, generator=gen)
    target = target * (torch.arange(n_tgt)[None, :] < torch.arange(n_tgt)[:, None])[None, :, :, None]
    src_tokens = src_tokens or tuple(f"s{i}" for i in range(n_src))
    tgt_tokens = tgt_tokens or tuple(f" t{j}" for j in range(n_tgt))
    return AttributionTensors(
        source=source, target=target, steps=torch.arange(n_tgt),
        step_scores={"probability": torch.rand(batch, n_tgt, dtype=torch.float64, generator=gen)},
        source_ids=torch.zeros(batch, n_src, dtype=torch.long),
        target_ids=torch.zeros(batch, n_tgt, dtype=torch.long),
        source_mask=torch.ones(batch, n_src, dtype=torch.bool),
        target_mask=torch.ones(batch, n_tgt, dtype=torch.bool),
        source_tokens=(tuple(src_tokens),) * batch, target_tokens=(tuple(tgt_tokens),) * batch,
        extra_dims=("hidden",), delta=delta,
        meta=meta or {"method": "integrated_gradients", "target_fn": "probability"})


def embedded(page: str) -> dict:
    """The JSON of the page's data element, with every row's detail inflated."""
    text = re.search(r'<script type="application/json" id="fnattr-data">(.*?)</script>', page, re.S)[1]
    data = json.loads(text)
    data["details"] = [json.loads(zlib.decompress(base64.b64decode(d))) for d in data["details"]]
    return data


def write_run(folder, rows: int, *, shard_size: int = 50, n_src: int = 6, n_tgt: int = 4):
    """A dataset run folder of `rows` examples with ids, written as `dataset.run` writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - start)
        out = result(n_src, n_tgt, batch=n, seed=s, src_tokens=[f" w{i}" for i in range(n_src)])
        src = tuple(tuple(f" w{start + b}" if i == 0 else f" w{i}" for i in range(n_src)) for b in range(n))
        meta = {**out.meta, "dataset_start": str(start), "dataset_end": str(start + n),
                "dataset_ids": json.dumps([f"ex-{start + b}" for b in range(n)])}
        out.replace(source_tokens=src, meta=meta).save(folder / dataset.SHARD.format(s))
    (folder / dataset.RUN_FILE).write_text(json.dumps({
        "format": dataset.RUN_FORMAT, "config": {"method": "integrated_gradients", "batch_size": shard_size},
        "examples": rows, "shards": [], "skipped": []}))
    return folder


# ---- what the page embeds -----------------------------------------------------------------------

def test_panel_holds_the_views_scores_and_caption():
    out = result(3, 4, delta=torch.tensor([[0.0, 0.5, 0.0, 0.0]], dtype=torch.float64))
    hm = views.heatmap(out)
    p = build.panel(out, 0)
    assert p["title"] == hm.title and p["notes"] == list(hm.notes) and p["flagged"] == list(hm.flagged)
    assert 1 in p["flagged"] and any(views.FLAG in n for n in p["notes"])  # step 1 did not converge
    assert "cells: sum over hidden" in " ".join(p["notes"])  # the view's default reduction, named
    for k in range(len(hm.cols)):
        for i in range(len(hm.rows)):
            v = float(hm.values[i, k])
            if math.isnan(v):  # a later target token: the step cannot see it
                assert p["values"][k][i] is None
            else:
                assert p["values"][k][i] == pytest.approx(v, rel=1e-5)
    assert p["values"][2][:3] == pytest.approx(out.source.sum(-1)[0, 2].tolist(), rel=1e-5)
    # running text: every source token is row i; every target token its column and its row
    assert [s[1] for s in p["source"]] == [0, 1, 2]
    assert [(g[1], g[2]) for g in p["gen"]] == [(3, 0), (4, 1), (5, 2), (-1, 3)]
    assert p["score"] == "probability" and p["scores"]["delta"][1] == 0.5
    assert p["vmax"] == pytest.approx(float(hm.values.nan_to_num().abs().max()), rel=1e-5)


def test_panel_follows_reduction_and_normalize_and_padding():
    out = result(4, 3)
    mask = torch.tensor([[False, True, True, True]])
    out = out.replace(source_mask=mask)
    p = build.panel(out, 0, reduction="l2", normalize=True)
    shown = views.heatmap(out, reduction="l2", normalize=True)
    assert len(p["source"]) == 3 and p["rows"] == list(shown.rows)
    assert p["values"][0][:3] == pytest.approx(shown.values[:3, 0].tolist(), rel=1e-5)
    assert "normalised per step" in " ".join(p["notes"]) and "L2 norm" in " ".join(p["notes"])


def test_a_batch_is_reduced_once_and_shows_each_row_as_alone():
    out = result(3, 3, batch=3, delta=torch.tensor([[0.0, 0.9, 0.0]] * 3, dtype=torch.float64))
    for options in ({}, {"reduction": "l2", "normalize": True}):
        details = build.gather(out, **options)["details"]
        for r in range(3):
            assert details[r]["panels"][0] == build.panel(out, r, **options)
            hm = views.heatmap(out, row=r, **options)
            assert details[r]["panels"][0]["notes"] == list(hm.notes) and hm.flagged == (1,)


def test_hostile_tokens_are_escaped_in_the_page_and_kept_as_text(tmp_path):
    meta = {"method": "</script><b>m</b>", "target_fn": "probability", "baseline": "<!-- \u2028"}
    out = result(4, 4, src_tokens=HOSTILE_SRC, tgt_tokens=HOSTILE_TGT, meta=meta)
    page = fnattr.report.page(build.gather(out))
    body = page.split('id="fnattr-data">', 1)[1].split("</script>", 1)[0]
    for bad in ("</script", "<!--", "<b>", "\u2028", "\u2029", "\x1b", "<"):
        assert bad not in body
    assert page.count("<script") == 2 and page.lower().count("</script>") == 2  # ours only
    assert "\x1b" not in page and "<b>m</b>" not in page
    p = embedded(page)["details"][0]["panels"][0]
    assert [s[0] for s in p["source"]] == [views.visible(t) for t in HOSTILE_SRC]
    assert [g[0] for g in p["gen"]] == [views.visible(t) for t in HOSTILE_TGT]
    assert p["gen"][0][0] == "\\x1b[2J\\x1b[31mred" and p["gen"][1][0] == "\u202eevil\u202c"
    assert p["gen"][3][3] is True  # a newline token breaks the line
    assert "baseline: <!-- \\u2028" in p["notes"]


def test_nan_and_infinite_scores_survive_json():
    out = result(2, 2)
    source = out.source.clone()
    source[0, 0, 0, 0] = math.nan
    source[0, 1, 1, 0] = math.inf
    p = build.panel(out.replace(source=source), 0)
    assert p["values"][0][0] == "NaN" and p["values"][1][1] == "Infinity"
    json.loads(build.dumps(p))  # strict JSON: no bare NaN


def test_colour_is_a_diverging_palette_with_readable_ink():
    assert build.colour(0.0, 1.0, signed=True) == build.STOPS[3]
    assert build.colour(1.0, 1.0, signed=True) == build.STOPS[-1]
    assert build.colour(-2.0, 1.0, signed=True) == build.STOPS[0]
    assert build.colour(-1.0, 1.0, signed=False) == build.STOPS[3]  # unsigned: white to red only
    assert build.ink(build.STOPS[0]) == "#ffffff" and build.ink(build.STOPS[3]) == "#000000"
    for v in torch.linspace(-1, 1, 41).tolist():  # WCAG AA contrast (4.5) everywhere
        rgb = build.colour(v, 1.0, signed=True)
        lum, text = build._luminance(rgb), build._luminance((0, 0, 0) if build.ink(rgb) == "#000000" else (255,) * 3)
        assert (max(lum, text) + 0.05) / (min(lum, text) + 0.05) >= 4.5


# ---- the three kinds of input -------------------------------------------------------------------

def test_result_file_and_method_write_the_same_report(tmp_path):
    out = result(3, 3, batch=2)
    out.save(tmp_path / "r.safetensors")
    path = out.report(tmp_path / "a.html", title="T")
    data = embedded(open(path, encoding="utf-8").read())
    again = embedded(fnattr.report.page(build.gather(str(tmp_path / "r.safetensors"), title="T")))
    assert data == again and data["kind"] == "result" and len(data["index"]) == 2
    assert data["details"][1]["panels"][0] == build.panel(out, 1)


def test_dataset_run_lists_every_row_with_its_id_and_view(tmp_path):
    folder = write_run(tmp_path / "run", 7, shard_size=3)
    data = embedded(fnattr.report.page(build.gather(folder)))
    assert data["kind"] == "run" and [e["id"] for e in data["index"]] == [f"ex-{i}" for i in range(7)]
    assert [e["n"] for e in data["index"]] == list(range(7))
    assert data["index"][4]["text"].startswith(" w4") and "7 examples in 3 shards" in data["summary"][0]
    shard = dataset.load_shards(folder)
    next(shard)
    second = next(shard)  # examples 3..5
    assert data["details"][4]["panels"][0] == build.panel(second, 1)
    top = data["index"][4]["top"]
    p = data["details"][4]["panels"][0]
    best = max((abs(v), i) for col in p["values"] for i, v in enumerate(col) if v is not None)
    assert abs(top[0][1]) == best[0] and top[0][0] == p["rows"][best[1]]


def test_several_results_side_by_side(tmp_path):
    a, b = result(3, 3, batch=2, seed=1), result(3, 3, batch=2, seed=2, meta={"method": "saliency", "target_fn": "probability"})
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    data = embedded(fnattr.report.page(build.gather([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])))
    assert data["kind"] == "compare"
    assert [p["name"] for p in data["details"][0]["panels"]] == ["integrated_gradients", "saliency"]
    assert data["details"][1]["panels"][1] == build.panel(b, 1, name="saliency")
    with pytest.raises(ValueError, match="different numbers of examples"):
        build.gather([a, result(3, 3, batch=3)])
    with pytest.raises(ValueError, match="row 0 holds other texts"):
        build.gather([a, result(3, 3, batch=2, src_tokens=("x", "y", "z"))])


@pytest.fixture(scope="module")
def evaluation(request, tmp_path_factory):
    """An `fnattr evaluate`-style folder of two methods on two examples (tiny gpt2), with the
    methods' own results of the same batch."""
    from tests.conftest import _get

    from fnattr.batch import prepare
    from fnattr.compare import compare_methods
    from fnattr.methods import METHODS
    from fnattr.targets import probability

    model, tok = _get(request, "gpt2")
    folder = tmp_path_factory.mktemp("evaluate")
    batch = prepare(model, tok, ["The cat sat", "Rome is a"], max_new_tokens=3)
    comp = compare_methods(model, None, batch, ["saliency", "occlusion"], n_boot=20, n_random=2,
                           curve_levels=4, fractions=(0.2, 0.5), out_dir=folder)
    files = []
    for name in comp.methods:
        path = folder / f"{name}.safetensors"
        METHODS[name](model, batch, probability).save(path)
        files.append(str(path))
    return folder, comp, files


def test_evaluate_folder_shows_faithfulness_and_panels(evaluation):
    folder, comp, files = evaluation
    data = embedded(fnattr.report.page(build.gather(str(folder))))
    assert data["kind"] == "compare" and len(data["index"]) == 2 and not data["details"][0]["panels"]
    f = data["details"][1]["faith"]
    assert list(f["methods"]) == ["saliency", "occlusion"]
    for m in comp.methods:
        for k in comp.metrics:
            assert f["methods"][m]["metrics"][k][0] == pytest.approx(float(comp.per_example[m][k][1]), rel=1e-5)
        faith = comp.results[m]
        mask = faith.step_mask[1]
        curve = (faith.deletion[1] * mask[:, None]).sum(0) / mask.sum()
        assert f["methods"][m]["curves"]["deletion"] == pytest.approx(curve.tolist(), rel=1e-5)
        assert f["methods"][m]["score"] == pytest.approx(faith.score[1][mask].tolist(), rel=1e-5)
    est = data["overall"]["estimates"]["occlusion"]["comprehensiveness"]
    assert est[0] == pytest.approx(comp.estimates["occlusion"]["comprehensiveness"].mean, rel=1e-5)
    assert embedded(fnattr.report.page(build.gather(comp)))["details"] == data["details"]
    both = embedded(fnattr.report.page(build.gather([str(folder), *files])))
    assert [p["name"] for p in both["details"][0]["panels"]] == ["saliency", "occlusion"]
    assert both["details"][0]["faith"] == data["details"][0]["faith"]


# ---- the command line ---------------------------------------------------------------------------

def test_cli_report_writes_refuses_and_explains(tmp_path, capsys):
    out = result(3, 3)
    out.save(tmp_path / "r.safetensors")
    html = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "r.safetensors"), "--out", str(html), "--quiet"]) == 0
    assert embedded(html.read_text(encoding="utf-8"))["details"][0]["panels"][0] == build.panel(out, 0)
    assert main(["report", str(tmp_path / "r.safetensors"), "--out", str(html)]) == 1
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.html")]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "m.html").exists()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "e.html")]) == 1
    assert "without a dataset run" in capsys.readouterr().err
    run = write_run(tmp_path / "run", 3)
    assert main(["report", str(run), "--out", str(tmp_path / "run.html"), "--reduce", "l2"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert "L2 norm" in " ".join(embedded((tmp_path / "run.html").read_text())["details"][0]["panels"][0]["notes"])


def test_cli_report_checks_paths_before_torch(tmp_path):
    from tests.test_cli_fast import HEAVY, run

    (tmp_path / "r.html").write_text("")
    code = ("import sys\nfrom fnattr import cli\n"
            "a = cli.main(['report', 'missing.safetensors'])\n"
            "b = cli.main(['report', '.', '--out', 'r.html'])\n"
            f"print(a, b, [m for m in {HEAVY!r} if m in sys.modules])\n")
    done, _ = run("-c", code, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "1 1 []", done.stderr
    assert "'missing.safetensors' does not exist" in done.stderr and "exists: pass --overwrite" in done.stderr


def test_page_needs_no_network():
    page = fnattr.report.page(build.gather(result(2, 2)))
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page

"""Heatmap matrix, terminal table, standalone HTML and PNG rendering."""

import html
import json
import io
import math
import struct
from html.parser import HTMLParser

import matplotlib.text
import pytest
import torch
from rich.console import Console

from fnattr import render
from fnattr.result import AttributionTensors

VOID = {"meta", "br", "img", "hr", "link", "input"}


def result(n_src=3, n_tgt=3, *, batch=1, hidden=2, seed=0, src_tokens=None, tgt_tokens=None,
           meta=None, delta=None):
    torch.manual_seed(seed)
    source = torch.randn(batch, n_tgt, n_src, hidden, dtype=torch.float64)
    target = torch.randn(batch, n_tgt, n_tgt, hidden, dtype=torch.float64)
    target = target * (torch.arange(n_tgt)[None, :] < torch.arange(n_tgt)[:, None])[None, :, :, None]
    src_tokens = src_tokens or tuple(f"s{i}" for i in range(n_src))
    tgt_tokens = tgt_tokens or tuple(f"t{j}" for j in range(n_tgt))
    return AttributionTensors(
        source=source, target=target, steps=torch.arange(n_tgt),
        step_scores={"probability": torch.rand(batch, n_tgt, dtype=torch.float64)},
        source_ids=torch.zeros(batch, n_src, dtype=torch.long),
        target_ids=torch.zeros(batch, n_tgt, dtype=torch.long),
        source_mask=torch.ones(batch, n_src, dtype=torch.bool),
        target_mask=torch.ones(batch, n_tgt, dtype=torch.bool),
        source_tokens=(src_tokens,) * batch, target_tokens=(tgt_tokens,) * batch,
        extra_dims=("hidden",), meta=meta or {"method": "test_method"}, delta=delta)


def test_heatmap_matrix_matches_the_scores():
    out = result(3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    mask[0, 0] = False  # a padded source position disappears
    padded_tgt = torch.ones(1, 4, dtype=torch.bool)
    padded_tgt[0, 3] = False  # ... and so does a padded step
    hm = render.heatmap(out.replace(source_mask=mask, target_mask=padded_tgt))
    assert hm.rows == ("s1", "s2", "t0", "t1") and hm.cols == ("t0", "t1", "t2")
    summed = out.source.sum(-1)[0]
    torch.testing.assert_close(hm.values[:2], summed[:3, 1:].T)
    tsum = out.target.sum(-1)[0]
    assert math.isnan(hm.values[2, 0]) and math.isnan(hm.values[3, 1])  # not visible yet
    torch.testing.assert_close(hm.values[2, 1:], tsum[1:3, 0])
    torch.testing.assert_close(hm.step_scores["probability"], out.step_scores["probability"][0, :3])


def test_rgb_palettes():
    assert render.rgb(2.0, 2.0, signed=True) == (255, 0, 0)
    assert render.rgb(-2.0, 2.0, signed=True) == (0, 0, 255)
    assert render.rgb(0.0, 2.0, signed=True) == (255, 255, 255)
    assert render.rgb(1.0, 2.0, signed=False) == (255, 128, 128)
    assert render.rgb(math.nan, 1.0, signed=True) == (255, 255, 255)


def test_terminal_table_colours_every_cell():
    out = result(2, 2, src_tokens=("The", " cat"), tgt_tokens=(" sat", "\n"))
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system="truecolor", width=200).print(
        render.table(render.heatmap(out)))
    text = buf.getvalue()
    for token in ("The", "cat", "sat", "\\n", "probability"):
        assert token in text
    values = render.heatmap(out).values
    finite = values[~values.isnan()]
    backgrounds = text.count("48;2;")
    assert backgrounds >= finite.numel()  # one coloured background per visible cell
    plain = io.StringIO()
    render.console(out, file=plain)
    assert "test_method" in plain.getvalue() and "\x1b[" not in plain.getvalue()


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.text, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)
        self.text.extend(v for _, v in attrs if v)

    def handle_startendtag(self, tag, attrs):
        self.text.extend(v for _, v in attrs if v)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_well_formed_standalone_and_has_every_token(tmp_path):
    tokens = ("<b>", "a & b", " \"q\"")
    out = result(3, 3, batch=2, src_tokens=tokens, tgt_tokens=("x", "</td>", "z"))
    path = tmp_path / "out.html"
    render.save_html(out, path)
    page = path.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack
    body = "".join(checker.text)
    for token in (*tokens, "x", "</td>", "z"):
        assert render.label(token) in body
    assert "<b>" not in page.replace("<body>", "")  # tokens are escaped, never markup
    assert "http" not in page and "src=" not in page  # no network assets
    assert page.count('class="fa"') == 2 and "legend" in page
    v = render.heatmap(out).values[0, 0].item()
    assert f"{v:.6g}" in page  # the exact value is in the hover text


@pytest.mark.parametrize("n", [4, 50])
def test_png_has_the_expected_pixel_size(tmp_path, n):
    out = result(n, n, hidden=1)
    path = tmp_path / "out.png"
    render.save_png(out, path, dpi=50)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    n_notes = len(render.heatmap(out).notes)
    assert (width, height) == render.png_size(n + n - 1, n, n_scores=1, n_notes=n_notes, dpi=50)
    if n == 50:  # 50 x 50 tokens keep at least 0.3 inch per cell
        assert width >= 50 * 0.3 * 50 and height >= 99 * 0.3 * 50


def test_show_prints_a_table_outside_notebooks(capsys):
    result(2, 2).show()
    assert "test_method" in capsys.readouterr().out
    result(2, 2).show(reduction="l2", normalize=True)
    assert "cells: L2 norm over hidden; normalised per step" in capsys.readouterr().out
    assert repr(result(2, 3)) == ("AttributionTensors(method='test_method', target_fn=None, "
                                  "source[batch step src hidden]=1x3x2x2, target=1x3x3x2, "
                                  "step_scores=['probability'], delta=None, tokens=['s0s1' -> 't0t1t2'])")


def test_heatmap_rejects_bad_row():
    with pytest.raises(ValueError, match="row"):
        render.heatmap(result(), row=3)


def test_label_makes_whitespace_visible():
    assert render.label("\n") == "\\n" and render.label(" ") == "\u2423" and render.label("") == "''"
    assert html.escape(render.label("<s>")) == "&lt;s&gt;"


def test_encoder_decoder_result_without_target_side(tmp_path):
    out = result(3, 2).replace(target=None)
    hm = render.heatmap(out)
    assert hm.rows == ("s0", "s1", "s2") and not hm.values.isnan().any()
    render.save_png(out, tmp_path / "o.png", dpi=40)
    assert "s2" in render.html(out)


def test_completeness_delta_is_shown_as_a_step_row(gpt2):
    from fnattr import prepare
    from fnattr.methods import integrated_gradients, saliency
    from fnattr.render import heatmap

    model, tok = gpt2
    batch = prepare(model, tok, ["A dog"], [" ran in the park"])
    ig = integrated_gradients(model, batch, n_steps=4)
    hm = heatmap(ig)
    assert list(hm.step_scores) == ["probability", "delta"]
    assert torch.equal(hm.step_scores["delta"], ig.delta[0].double())
    assert "delta" not in heatmap(saliency(model, batch)).step_scores


# ---- what the numbers are: reduction, normalisation, baseline, completeness -------------------

def plain(out, **view):
    buf = io.StringIO()
    render.console(out, file=buf, **view)
    return buf.getvalue()


def columns(hm):
    """Per column (step): the scores of its visible rows."""
    return [hm.values[:, k][~hm.values[:, k].isnan()] for k in range(len(hm.cols))]


_RUNS: dict = {}  # computed once: the tests below only read them


@pytest.fixture
def runs(gpt2):
    from fnattr import prepare
    from fnattr.methods import attention, integrated_gradients, saliency

    if not _RUNS:
        model, tok = gpt2
        batch = prepare(model, tok, ["A dog"], [" ran in the park"])
        _RUNS.update(saliency=saliency(model, batch), attention=attention(model, batch),
                     integrated_gradients=integrated_gradients(model, batch, n_steps=4))
    return _RUNS


def test_default_reductions_follow_the_method(runs):
    sal, att, ig = runs["saliency"], runs["attention"], runs["integrated_gradients"]
    hm = render.heatmap(sal)  # gradients: the L2 norm over hidden
    n = hm.n_source
    torch.testing.assert_close(hm.values[:n], torch.linalg.vector_norm(sal.source[0], dim=-1).T.double())
    assert "cells: L2 norm over hidden; not normalised" in hm.notes
    hm = render.heatmap(ig)  # additive: the sum, so a column adds up to the step's total
    total = ig.source[0].sum((1, 2)) + ig.target[0].sum((1, 2))
    torch.testing.assert_close(torch.stack([c.sum() for c in columns(hm)]), total.double())
    assert "cells: sum over hidden; not normalised" in hm.notes
    hm = render.heatmap(att)  # attention: the mean over layers and heads, still a distribution
    torch.testing.assert_close(hm.values[:n], att.source[0].mean((-1, -2)).T.double())
    torch.testing.assert_close(torch.stack([c.sum() for c in columns(hm)]),
                               torch.ones(len(hm.cols), dtype=torch.float64))
    assert "cells: mean over layer, head; not normalised" in hm.notes
    assert render.heatmap(att, reduction="max").values[0, 0] == att.source[0, 0, 0].max()


def test_normalized_columns_have_abs_sum_one(runs):
    ig = runs["integrated_gradients"]
    hm = render.heatmap(ig, normalize=True)
    torch.testing.assert_close(torch.stack([c.abs().sum() for c in columns(hm)]),
                               torch.ones(len(hm.cols), dtype=torch.float64))
    raw = render.heatmap(ig)
    assert torch.equal(hm.step_scores["delta"], raw.step_scores["delta"])  # delta in f's units
    assert any("normalised per step" in n for n in hm.notes)
    text = plain(ig, normalize=True)
    assert "sum over hidden; normalised per step (|scores| of a column sum to 1)" in text


def test_caption_names_method_target_reduction_baseline_and_points(runs):
    ig = runs["integrated_gradients"]
    base = "zero vector (UNK '<|endoftext|>' is a special token)"
    text = plain(ig.replace(meta={**ig.meta, "baseline": base}))
    for part in ("integrated_gradients, target probability", f"baseline: {base}",
                 "cells: sum over hidden; not normalised", "completeness, 4 points: every step has"):
        assert part in text
    assert "baseline: unk" in plain(ig)  # without meta["baseline"]: the method's argument
    assert "baseline" not in plain(runs["saliency"]) and "completeness" not in plain(runs["saliency"])


RECORD = {"tolerance": 0.05, "relative_error": [[0.01, 0.3, 0.2]], "unconverged": [[0, 1], [0, 2]],
          "points": [[16, 16, 16]]}


def flagged_result(record=RECORD, **kw):
    delta = torch.tensor([[0.0, 0.5, 0.3]], dtype=torch.float64)
    meta = {"method": "integrated_gradients", "target_fn": "probability"}
    if record is not None:
        meta["completeness"] = json.dumps(record)
    return result(3, 3, meta=meta, delta=delta, **kw)


def test_unconverged_steps_are_flagged_in_console_html_and_png(tmp_path):
    out = flagged_result()
    hm = render.heatmap(out)
    assert hm.flagged == (1, 2) and hm.header(0) == "t0" and hm.header(1) == "\u26a0 t1"
    line = ("completeness, 16 points: \u26a0 steps 1 't1' (30%), 2 't2' (20%) have "
            "|delta| > 5% of |f(x) - f(baseline)|")
    assert hm.notes[-1] == line
    text = plain(out)
    assert "\u26a0 t1" in text and "\u26a0 t2" in text and "\u26a0 t0" not in text and line in text
    page = render.html(out)
    assert '<th class="flag">\u26a0 t1</th>' in page and "<th>t0</th>" in page
    assert html.escape(line) in page
    fig = render.figure(out)
    ticks = [t for t in fig.axes[0].get_xticklabels()]
    assert [t.get_text() for t in ticks] == ["t0", "\u26a0 t1", "\u26a0 t2"]
    assert ticks[1].get_color() == "#cc0000" and ticks[0].get_color() != "#cc0000"
    assert any(line.startswith(t.get_text()) and "\u26a0" in t.get_text() for t in fig.texts)
    render.save_png(out, tmp_path / "flag.png", dpi=40)
    # converged: no marker anywhere
    ok = flagged_result({**RECORD, "unconverged": []})
    assert render.heatmap(ok).flagged == () and "\u26a0" not in plain(ok) + render.html(ok)
    assert "every step has |delta| <= 5% of |f(x) - f(baseline)|" in plain(ok)


@pytest.mark.parametrize("method, args, rule, says", [
    ("integrated_gradients", {"n_steps": "auto", "method": "gausslegendre"}, None, True),
    ("layer_integrated_gradients", {"n_steps": "auto", "method": "riemann_trapezoid"}, None, True),
    ("integrated_gradients", {"n_steps": "auto", "method": "adaptive"}, None, False),
    ("integrated_gradients", {"n_steps": "auto", "method": "auto"}, "adaptive", False),
    ("integrated_gradients", {"n_steps": "auto", "method": "auto"}, "gausslegendre", True),
    ("integrated_gradients", {"n_steps": 16, "method": "gausslegendre"}, None, False),
    ("sequential_integrated_gradients", {"n_steps": "auto", "method": "gausslegendre"}, None, False)])
def test_unconverged_ig_on_a_fixed_rule_points_to_adaptive(method, args, rule, says):
    """The rule that ran is the record's (method="auto" resolves per call), else the argument."""
    out = flagged_result(RECORD if rule is None else {**RECORD, "rule": rule})
    out = out.replace(meta={**out.meta, "method": method, "args": json.dumps(args)})
    assert ("|delta| > 5% of |f(x) - f(baseline)|; try method='adaptive'" in plain(out)) == says
    ok = flagged_result({**RECORD, "unconverged": []})
    assert "adaptive" not in plain(ok.replace(meta={**ok.meta, "method": method, "args": json.dumps(args)}))


def test_without_a_record_delta_is_compared_with_the_step_score():
    out = flagged_result(None)  # probability is rand(): |delta| 0.5 at step 1 exceeds 5% of it
    prob = out.step_scores["probability"][0]
    expected = tuple(k for k in range(3) if abs(out.delta[0, k]) > 0.05 * abs(prob[k]))
    hm = render.heatmap(out)
    assert hm.flagged == expected and 1 in expected and 0 not in expected
    rule = "|delta| > 5% of |probability| (no completeness record: delta against the step score)"
    assert rule in hm.notes[-1]


def test_hostile_strings_render_literally(tmp_path):
    base = "[/INST] $$ \\alpha$ <b>x</b> [bold]y[/bold] \x1b[2J"
    meta = {"method": "integrated_gradients", "target_fn": "probability", "baseline": base}
    out = result(2, 2, meta=meta, src_tokens=("$x^2$", "[/INST]"), tgt_tokens=("[b]", "<i>"))
    shown = base.replace("\x1b", "\\x1b")
    text = plain(out)
    assert f"baseline: {shown}" in text and "[/INST]" in text and "[b]" in text
    assert "\x1b" not in text
    colour = io.StringIO()
    Console(file=colour, force_terminal=True, width=300).print(render.table(render.heatmap(out)))
    assert "\x1b[2J" not in colour.getvalue()  # a control sequence is never sent to the terminal
    page = render.html(out)
    assert html.escape(f"baseline: {shown}") in page and "<b>x" not in page and "<i>" not in page
    fig = render.figure(out)
    texts = [t for t in fig.findobj(matplotlib.text.Text) if "$" in t.get_text()]
    assert "$x^2$" in {t.get_text() for t in texts}
    assert f"baseline: {shown}" in " ".join(t.get_text() for t in fig.texts)  # caption, wrapped
    assert all(not t.get_parse_math() for t in texts)  # mathtext off: drawn as written
    render.save_png(out, tmp_path / "hostile.png", dpi=40)


# ---- notebooks: repr, _repr_html_; the per-step plot ------------------------------------------

def test_repr_is_short_and_names_method_shapes_and_tokens():
    out = result(3, 2, batch=5, src_tokens=("The", " capital\n", " x" * 40), tgt_tokens=(" Paris", "."),
                 meta={"method": "saliency", "target_fn": "probability"})
    out = out.replace(source_mask=out.source_mask.clone().index_put_((torch.tensor([0]), torch.tensor([0])),
                                                                      torch.tensor(False)))
    text = repr(out)
    assert "method='saliency'" in text and "target_fn='probability'" in text
    assert "source[batch step src hidden]=5x2x3x2" in text and "target=5x2x2x2" in text
    assert "' capital\\n x x x" in text and "-> ' Paris.'" in text  # padding dropped, escaped
    assert "\u2026" in text and "... 3 more" in text and text.count("->") == 2  # two rows shown
    assert "\n" not in text and len(text) < 400  # one short line whatever the batch size
    assert "[0.]" not in text and "tensor" not in text  # shapes, never numbers


def test_repr_html_is_the_escaped_heatmap_of_the_first_rows():
    out = result(2, 2, batch=10, src_tokens=("<script>", "a&b"), tgt_tokens=("</td>", "$x$"))
    page = out._repr_html_()
    assert page.startswith("<div>") and "<!DOCTYPE" not in page  # a fragment for the notebook
    assert "&lt;script&gt;" in page and "a&amp;b" in page and "&lt;/td&gt;" in page
    assert "<script>" not in page and "</td>," not in page
    assert page.count('class="fa"') == render.NOTEBOOK_ROWS and "rows 0-7 of 10 shown" in page
    small = result(2, 2, batch=2)
    assert small._repr_html_().count('class="fa"') == 2 and "shown" not in small._repr_html_()
    with pytest.raises(ValueError, match="max_rows"):
        render.html(small, max_rows=0)


def test_step_plot_draws_the_step_scores_with_the_top_tokens(tmp_path):
    tokens = ("$x^2$", "[/INST]", "\\alpha")
    out = result(3, 3, batch=2, src_tokens=tokens, tgt_tokens=("$$", " Paris", "\n"),
                 meta={"method": "integrated_gradients", "target_fn": "probability"})
    out = out.replace(step_scores={**out.step_scores, "logprob": torch.zeros(2, 3, dtype=torch.float64)})
    fig = render.step_plot(out, tmp_path / "steps.png", row=1, top_k=2)
    assert type(fig).__name__ == "Figure" and (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["$$", " Paris", "\\n"]
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == out.step_scores["probability"][1].tolist()
    assert ax.get_ylabel() == "probability"
    hm = render.heatmap(out, row=1)
    tops = render.views.top_tokens(hm, 2)
    labels = [t.get_text() for t in fig.axes[1].texts]
    for k, top in enumerate(tops):
        column = hm.values[:, k]
        order = column[~column.isnan()].abs().sort(descending=True).values
        assert [abs(v) for _, v in top] == order[:2].tolist()  # the two largest |score|
        assert labels[k] == "\n".join(f"{name} {v:+.2g}" for name, v in top)
    assert "$x^2$" in " ".join(labels) or "[/INST]" in " ".join(labels)
    texts = fig.findobj(matplotlib.text.Text)
    assert all(not t.get_parse_math() for t in texts if "$" in t.get_text())  # drawn as written
    assert render.step_plot(out, score="logprob").axes[0].get_ylabel() == "logprob"
    with pytest.raises(ValueError, match=r"no step score 'entropy' \(it has 'probability', 'logprob'\)"):
        render.step_plot(out, score="entropy")
    with pytest.raises(ValueError, match="top_k"):
        render.step_plot(out, top_k=0)

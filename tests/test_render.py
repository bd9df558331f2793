"""Heatmap matrix, terminal table, standalone HTML and PNG rendering."""

import html
import io
import math
import struct
from html.parser import HTMLParser

import pytest
import torch
from rich.console import Console

from fnattr import render
from fnattr.result import AttributionTensors

VOID = {"meta", "br", "img", "hr", "link", "input"}


def result(n_src=3, n_tgt=3, *, batch=1, hidden=2, seed=0, src_tokens=None, tgt_tokens=None):
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
        extra_dims=("hidden",), meta={"method": "test_method"})


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
    assert (width, height) == render.png_size(n + n - 1, n, n_scores=1, dpi=50)
    if n == 50:  # 50 x 50 tokens keep at least 0.3 inch per cell
        assert width >= 50 * 0.3 * 50 and height >= 99 * 0.3 * 50


def test_show_prints_a_table_outside_notebooks(capsys):
    result(2, 2).show()
    assert "test_method" in capsys.readouterr().out


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

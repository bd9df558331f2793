"""Token-by-step heatmaps of an AttributionTensors: terminal (rich), standalone HTML, PNG.

Rows are the attributed tokens (source tokens, then earlier target tokens), columns the
generated tokens (attributed steps); step scores follow as extra rows. `*extra` dims are reduced
the way that fits the method (`fnattr.views.DEFAULT_REDUCTION`; `reduction=` for another) and,
with `normalize=True`, each column is divided by the sum of its absolute scores. The caption says
what a cell holds, the baseline, and whether a path integral converged; a step whose completeness
error is too large is flagged next to its column.
"""

import html as _html
import math
import os
import sys

import torch

from fnattr.render import views
from fnattr.aggregate import Reducer
from fnattr.result import AttributionTensors
from fnattr.render.views import FLAG
from fnattr.render.views import Heatmap as Heatmap  # the matrices drawn here: importable from render too
from fnattr.render.views import heatmap as heatmap
from fnattr.render.views import heatmaps as heatmaps
from fnattr.render.views import label as label
from fnattr.render.views import visible as visible


# ---- colours -------------------------------------------------------------------------------

def rgb(value: float, vmax: float, *, signed: bool) -> tuple[int, int, int]:
    """Diverging blue-white-red for signed scores, white-red otherwise; `value` scaled by `vmax`."""
    if math.isnan(value):
        return (255, 255, 255)
    x = max(-1.0, min(1.0, value / vmax))
    if not signed:
        x = max(x, 0.0)
    fade = round(255 * (1 - abs(x)))
    return (255, fade, fade) if x >= 0 else (fade, fade, 255)


def _ink(colour: tuple[int, int, int]) -> str:
    return "black" if sum(colour) > 3 * 150 else "white"


def _scale(vmax: float) -> int:
    """Power of ten that brings `vmax` into a readable range (0 when it already is)."""
    e = math.floor(math.log10(vmax)) if vmax > 0 else 0
    return 0 if -1 <= e <= 2 else e


def _fmt(value: float, exponent: int) -> str:
    return "" if math.isnan(value) else f"{value / 10 ** exponent:.2f}"


def _vmax(hm: Heatmap) -> float:
    """The largest finite |score| (1 when there is none): an infinite score saturates its colour."""
    finite = hm.values[hm.values.isfinite()].abs()
    return float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0


NAN_COLOUR = (255, 0, 255)  # a cell that is NaN although the step sees its token
NAN_TIP = "NaN: not a number (the model or the method gave no score)"


def hidden(out: AttributionTensors, hm: Heatmap, row: int = 0) -> torch.Tensor:
    """Which cells of `hm` (batch row `row` of `out`) are blank because the step cannot see
    that token (a later target token); any other NaN cell is a real NaN score."""
    mask = torch.zeros(hm.values.shape, dtype=torch.bool)
    if out.target is not None and len(hm.rows) > hm.n_source:
        steps = out.steps[out.step_mask[row].nonzero().squeeze(1)]
        seen = out.target_mask[row] & (torch.arange(out.target_mask.shape[1]) < int(steps.max()))
        mask[hm.n_source:] = seen.nonzero().squeeze(1)[:, None] >= steps[None, :]
    return mask


def _nan_cells(hm: Heatmap, hide: torch.Tensor | None) -> torch.Tensor:
    """NaN cells that are not hidden (without `hide`: NaN among the source rows only)."""
    if hide is None:
        hide = torch.zeros(hm.values.shape, dtype=torch.bool)
        hide[hm.n_source:] = True
    return hm.values.isnan() & ~hide


def _nan_note(nan: torch.Tensor) -> list[str]:
    n = int(nan.sum())
    return [f"{FLAG} {n} cell{'s' * (n != 1)} NaN: not a number (the model or the method gave no "
            "score), not hidden"] if n else []


# ---- terminal ------------------------------------------------------------------------------

def _caption(hm: Heatmap, exp: int, nan: torch.Tensor) -> list[str]:
    return [*hm.notes, *_nan_note(nan), *([f"cell values x 1e{exp}"] if exp else [])]


def table(hm: Heatmap, *, hide: torch.Tensor | None = None):
    """`hm` for rich: a Table of coloured score cells and one row per step score, then the caption
    lines (what a cell holds, baseline, completeness), wrapped to the console rather than to the
    table. Every text is a rich `Text`, never markup. Cells in `hide` (`hidden(out, hm, row)`)
    stay blank; any other NaN cell says NaN, in magenta."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    vmax, signed, nan = _vmax(hm), hm.signed, _nan_cells(hm, hide)
    exp = _scale(vmax)
    grid = Table(title=Text(hm.title, style="bold"), show_lines=False, pad_edge=False)
    grid.add_column("", style="bold", no_wrap=True)
    for k in range(len(hm.cols)):
        flagged = k in hm.flagged
        grid.add_column(Text(hm.header(k), style="bold red" if flagged else ""),
                        justify="right", no_wrap=True)
    for i, name in enumerate(hm.rows):
        cells = []
        for k, v in enumerate(hm.values[i].tolist()):
            if nan[i, k]:
                cells.append(Text("NaN", style="bold white on rgb(255,0,255)"))
                continue
            bg = rgb(v, vmax, signed=signed)
            style = "" if math.isnan(v) else f"{_ink(bg)} on rgb({bg[0]},{bg[1]},{bg[2]})"
            cells.append(Text(_fmt(v, exp), style=style))
        grid.add_row(Text(name, style="dim" if i >= hm.n_source else ""), *cells,
                     end_section=i == len(hm.rows) - 1)
    for name, scores in hm.step_scores.items():
        marked = name == "delta"
        grid.add_row(Text(name, style="italic"), *(
            Text(f"{v:.3g}", style="bold red" if marked and k in hm.flagged else "")
            for k, v in enumerate(scores.tolist())))
    return Group(grid, *(Text(line, style="red" if line.count(FLAG) else "dim")
                         for line in _caption(hm, exp, nan)))


def console(
    out: AttributionTensors, *, file=None, width: int | None = None,
    reduction: str | Reducer | None = None, normalize: bool = False, group_by=None,
    show_template: bool = False,
) -> None:
    """Print every batch row of `out` as a coloured table (to `file`, default stdout);
    `reduction` / `normalize` as in `heatmap`."""
    from rich.console import Console

    file = file or sys.stdout
    if width is None and not (hasattr(file, "isatty") and file.isatty()):
        width = 1000  # a pipe or file: never truncate cells to a guessed 80 columns
    con = Console(file=file, width=width)
    for row, hm in enumerate(heatmaps(out, reduction=reduction, normalize=normalize,
                                               group_by=group_by,
                                               show_template=show_template)):
        con.print(table(hm, hide=hidden(out, hm, row)))


# ---- HTML ----------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:1em}
table.fa{border-collapse:collapse;margin:1em 0;font-size:13px}
table.fa th,table.fa td{border:1px solid #ddd;padding:2px 6px;white-space:pre;text-align:right}
table.fa th.row{text-align:left}table.fa tr.tgt th.row{color:#666}
table.fa tr.score td{background:#f5f5f5;font-style:italic}
table.fa .flag{color:#c00;font-weight:bold}p.note{margin:2px 0;font-size:12px;color:#444}
.legend{display:flex;align-items:center;gap:6px;font-size:12px}
.legend .bar{width:200px;height:12px;border:1px solid #999}"""


def _legend(hm: Heatmap) -> str:
    lo, mid = (-_vmax(hm), "#ffffff") if hm.signed else (0.0, "#ff8080")
    start = "#0000ff" if hm.signed else "#ffffff"
    return (f'<div class="legend"><span>{lo:.3g}</span><span class="bar" style="background:'
            f'linear-gradient(to right,{start},{mid},#ff0000)"></span><span>{_vmax(hm):.3g}</span>'
            "<span>score</span></div>")


def _html_table(hm: Heatmap, hide: torch.Tensor | None = None) -> str:
    e = _html.escape
    vmax, nan = _vmax(hm), _nan_cells(hm, hide)
    exp = _scale(vmax)
    flag = lambda k: ' class="flag"' if k in hm.flagged else ""  # noqa: E731
    head = "".join(f"<th{flag(k)}>{e(hm.header(k))}</th>" for k in range(len(hm.cols)))
    lines = [f"<h2>{e(hm.title)}</h2>",
             *(f'<p class="note">{e(n)}</p>' for n in (*hm.notes, *_nan_note(nan))), _legend(hm), '<table class="fa">', f"<thead><tr><th></th>{head}</tr></thead>", "<tbody>"]
    for i, name in enumerate(hm.rows):
        cells = []
        for k, v in enumerate(hm.values[i].tolist()):
            colour = NAN_COLOUR if nan[i, k] else rgb(v, vmax, signed=hm.signed)
            tip = NAN_TIP if nan[i, k] else "not visible" if math.isnan(v) else f"{v:.6g}"
            cells.append(f'<td style="background:rgb{colour};color:{_ink(colour)}" '
                         f'title="{e(name)} -&gt; {e(hm.cols[k])}: {tip}">'
                         f'{"NaN" if nan[i, k] else _fmt(v, exp)}</td>')
        kind = "src" if i < hm.n_source else "tgt"
        lines.append(f'<tr class="{kind}"><th class="row">{e(name)}</th>{"".join(cells)}</tr>')
    for name, scores in hm.step_scores.items():
        cells = "".join(f'<td{flag(k) if name == "delta" else ""} title="{e(name)}: {v:.6g}">{v:.3g}</td>'
                        for k, v in enumerate(scores.tolist()))
        lines.append(f'<tr class="score"><th class="row">{e(name)}</th>{cells}</tr>')
    lines.append("</tbody></table>")
    if exp:
        lines.append(f"<p>cell values x 1e{exp}; hover a cell for its exact score.</p>")
    return "\n".join(lines)


NOTEBOOK_ROWS = 8  # batch rows a notebook cell draws (`AttributionTensors._repr_html_`)


def html(
    out: AttributionTensors, *, standalone: bool = True, reduction: str | Reducer | None = None,
    normalize: bool = False, max_rows: int | None = None, group_by=None,
    show_template: bool = False,
) -> str:
    """Every batch row (the first `max_rows`, with a note saying so) as an HTML heatmap;
    `standalone` wraps it in a page with no network assets."""
    n = out.source.shape[0]
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"`max_rows`={max_rows}: draw at least 1 row, or None for all {n}.")
    shown = range(n if max_rows is None else min(n, max_rows))
    maps = [(r, heatmap(out, row=r, reduction=reduction, normalize=normalize, group_by=group_by,
                 show_template=show_template))
            for r in shown]
    body = "\n".join(_html_table(hm, hidden(out, hm, r)) for r, hm in maps)
    if len(shown) < n:
        body += (f'\n<p class="note">rows 0-{len(shown) - 1} of {n} shown: '
                 "<code>fnattr.render.html(out)</code> draws them all, "
                 "<code>fnattr.render.heatmap(out, row=r)</code> one.</p>")
    if not standalone:
        return f"<div><style>{_CSS}</style>\n{body}\n</div>"
    title = _html.escape(visible(views.title(out)))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def save_html(out: AttributionTensors, path: str | os.PathLike, **options) -> None:
    """Write `html(out, **options)` to `path`; `options`: `reduction`, `normalize`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(html(out, **options))


# ---- PNG -----------------------------------------------------------------------------------

CELL_INCHES = 0.3
MARGIN_INCHES = (2.0, 1.6)  # (left + right, top + bottom) room for labels, colour bar, title
NOTE_INCHES = 0.16  # one caption line under the heatmap


def png_size(n_rows: int, n_cols: int, *, n_scores: int = 0, n_notes: int = 0,
             dpi: int = 100) -> tuple[int, int]:
    """Pixel (width, height) of the PNG for a heatmap of `n_rows` x `n_cols` (+ step score rows,
    + caption lines)."""
    w = max(4.0, n_cols * CELL_INCHES + MARGIN_INCHES[0] + 1.0)
    h = max(3.0, (n_rows + n_scores) * CELL_INCHES + MARGIN_INCHES[1] + 0.6) + n_notes * NOTE_INCHES
    return round(w * dpi), round(h * dpi)


LABEL_CHARS = 40  # a token label on a PNG axis is cut to this many characters (the title to 4x)
NOTE_LINES = 4  # caption lines a PNG shows per note


def _short(text: str, chars: int = LABEL_CHARS) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "\u2026"


def _wrap(notes: tuple[str, ...], inches: float) -> list[str]:
    import textwrap

    chars = max(30, int(inches / 0.075))  # about 0.075 inch per character at 8 pt
    return [piece for n in notes for piece in textwrap.wrap(
        _short(n, chars * NOTE_LINES), chars, break_on_hyphens=False) or [""]]


def figure(out: AttributionTensors, *, row: int = 0, dpi: int = 100,
           reduction: str | Reducer | None = None, normalize: bool = False, group_by=None,
           show_template: bool = False):
    """A matplotlib Figure of batch row `row`: tokens on both axes, colour bar, step scores,
    caption lines under it. Every text is drawn literally (mathtext off)."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    hm = heatmap(out, row=row, reduction=reduction, normalize=normalize, group_by=group_by,
                 show_template=show_template)
    nan, vmax = _nan_cells(hm, hidden(out, hm, row)), _vmax(hm)
    n_r, n_c, n_s = len(hm.rows), len(hm.cols), len(hm.step_scores)
    w_in = png_size(n_r, n_c, dpi=dpi)[0] / dpi
    notes = _wrap((*hm.notes, *_nan_note(nan)), w_in - 0.4)
    w, h = png_size(n_r, n_c, n_scores=n_s, n_notes=len(notes), dpi=dpi)
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    font, lit = 7 if max(n_r, n_c) > 20 else 9, {"parse_math": False}
    heights = [n_r] + ([n_s] if n_s else [])
    bottom = 0.3 + len(notes) * NOTE_INCHES
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[40, 1],
                            left=1.6 / (w / dpi), right=1 - 0.9 / (w / dpi),
                            top=1 - 1.2 / (h / dpi), bottom=bottom / (h / dpi), hspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    cmap = matplotlib.colormaps["RdBu_r" if hm.signed else "Reds"].with_extremes(bad="#eeeeee")
    lo = -vmax if hm.signed else 0.0
    image = ax.imshow(hm.values.numpy(), cmap=cmap, vmin=lo, vmax=vmax, aspect="auto")
    if nan.any():  # NaN scores in magenta, marked; hidden cells stay grey
        overlay = torch.zeros(*nan.shape, 4)
        overlay[nan] = torch.tensor([*NAN_COLOUR, 255]) / 255
        ax.imshow(overlay.numpy(), aspect="auto")
        for i, k in nan.nonzero().tolist():
            ax.text(k, i, "NaN", ha="center", va="center", fontsize=font - 3, color="white")
    ax.set_yticks(range(n_r), [_short(r) for r in hm.rows], fontsize=font, **lit)
    ax.set_xticks(range(n_c), [_short(hm.header(k)) for k in range(n_c)], fontsize=font,
                  rotation=90, **lit)
    ax.xaxis.tick_top()
    for k in hm.flagged:
        ax.get_xticklabels()[k].set_color("#cc0000")
    if n_r > hm.n_source:
        ax.axhline(hm.n_source - 0.5, color="black", linewidth=0.8)
    ax.set_title(_short(hm.title, LABEL_CHARS * 4), fontsize=font + 2, pad=4, **lit)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]))
    if n_s:
        sax = fig.add_subplot(grid[1, 0], sharex=ax)
        scores = torch.stack(list(hm.step_scores.values())).numpy()
        sax.imshow(scores, cmap="Greys", aspect="auto", alpha=0.35)
        for (i, k), v in zip(((i, k) for i in range(n_s) for k in range(n_c)), scores.flat):
            bad = list(hm.step_scores)[i] == "delta" and k in hm.flagged
            sax.text(k, i, f"{v:.2g}", ha="center", va="center", fontsize=font - 3,
                     color="#cc0000" if bad else "black")
        sax.set_yticks(range(n_s), list(hm.step_scores), fontsize=font, **lit)
        sax.tick_params(axis="x", bottom=False, labelbottom=False, top=False, labeltop=False)
    for i, line in enumerate(notes):
        fig.text(0.2 / (w / dpi), (0.1 + (len(notes) - i - 0.5) * NOTE_INCHES) / (h / dpi), line,
                 fontsize=8, va="center", ha="left", **lit)
    return fig


def save_png(out: AttributionTensors, path: str | os.PathLike, *, row: int = 0, dpi: int = 100,
             **options) -> None:
    """Write `figure(out, row=row, **options)` as a PNG; `options`: `reduction`, `normalize`."""
    figure(out, row=row, dpi=dpi, **options).savefig(os.fspath(path), dpi=dpi, format="png")


# ---- per-step plot ---------------------------------------------------------------------------

def step_plot(out: AttributionTensors, path: str | os.PathLike | None = None, *, row: int = 0,
              top_k: int = 3, score: str | None = None, dpi: int = 100,
              reduction: str | Reducer | None = None, normalize: bool = False, group_by=None,
              show_template: bool = False):
    """A matplotlib Figure of batch row `row`, one point per generated token: the attributed
    target's step score (`score`: another step score), each step labelled with the `top_k`
    tokens of largest |score| in its column of the heatmap (same reduction and normalisation).
    With `path`, also written as a PNG. Every text is drawn literally (mathtext off).

    >>> step_plot(out, "steps.png", top_k=3)   # x: generated tokens, y: P(token)
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    hm = heatmap(out, row=row, reduction=reduction, normalize=normalize, group_by=group_by,
                 show_template=show_template)
    name, ys = views.step_score(out, hm, score)
    tops = views.top_tokens(hm, top_k)
    n_c, lit = len(hm.cols), {"parse_math": False}
    w = max(6.0, 1.1 * n_c + 2.0)
    notes = _wrap((*hm.notes, f"labels: the {top_k} tokens with the largest |score| of each step"), w - 0.4)
    band, rotate = 0.2 + 0.16 * top_k, n_c > 8
    bottom = (1.2 if rotate else 0.7) + len(notes) * NOTE_INCHES
    h = 2.8 + band + bottom
    fig = Figure(figsize=(w, h), dpi=dpi)
    grid = fig.add_gridspec(2, 1, height_ratios=[band, 2.0], hspace=0.02, left=1.2 / w,
                            right=1 - 0.3 / w, top=1 - 0.5 / h, bottom=bottom / h)
    ax = fig.add_subplot(grid[1, 0])
    ax.plot(range(n_c), ys.tolist(), marker="o", color="#1f4e9c")
    ax.set_xticks(range(n_c), [_short(hm.header(k)) for k in range(n_c)], rotation=90 if rotate else 0,
                  fontsize=8, **lit)
    for k in hm.flagged:
        ax.get_xticklabels()[k].set_color("#cc0000")
    ax.set_xlim(-0.5, n_c - 0.5)
    ax.set_ylabel(name, **lit)
    ax.grid(axis="y", alpha=0.3)
    tax = fig.add_subplot(grid[0, 0], sharex=ax)
    tax.set_axis_off()
    for k, top in enumerate(tops):
        text = "\n".join(f"{_short(token)} {value:+.2g}" for token, value in top)
        tax.text(k, 0.0, text, ha="center", va="bottom", fontsize=7, transform=tax.get_xaxis_transform(),
                 **lit)
    fig.suptitle(_short(hm.title, LABEL_CHARS * 4), fontsize=10, **lit)
    for i, line in enumerate(notes):
        fig.text(0.2 / w, (0.1 + (len(notes) - i - 0.5) * NOTE_INCHES) / h, line,
                 fontsize=8, va="center", ha="left", **lit)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi, format="png")
    return fig


# ---- notebook or terminal --------------------------------------------------------------------

def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def show(out: AttributionTensors, *, reduction: str | Reducer | None = None,
         normalize: bool = False, group_by=None) -> None:
    """HTML in a Jupyter notebook, a coloured table in a terminal; options as in `heatmap`."""
    if _in_notebook():
        from IPython.display import HTML, display
        display(HTML(html(out, standalone=False, reduction=reduction, normalize=normalize,
                          group_by=group_by)))
    else:
        console(out, reduction=reduction, normalize=normalize, group_by=group_by)

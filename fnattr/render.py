"""Token-by-step heatmaps of an AttributionTensors: terminal (rich), standalone HTML, PNG.

Rows are the attributed tokens (source tokens, then earlier target tokens), columns the
generated tokens (attributed steps); step scores follow as extra rows. Scores with `*extra`
dimensions are summed over them first (reduce them yourself with `fnattr.aggregate.reduce`
for another reduction).
"""

import dataclasses
import html as _html
import math
import os
import sys

import torch
from torch import Tensor

from fnattr.aggregate import reduce
from fnattr.result import AttributionTensors


@dataclasses.dataclass(frozen=True)
class Heatmap:
    """One batch row as a matrix: `values[i, k]` scores row token i for column (step) k.

    `values` is NaN where the row token is not visible to the step (a later target token).
    `step_scores[name][k]` holds the step score of column k.
    """

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    values: Tensor
    step_scores: dict[str, Tensor]
    n_source: int
    title: str

    @property
    def signed(self) -> bool:
        finite = self.values[~self.values.isnan()]
        return bool((finite < 0).any())

    @property
    def vmax(self) -> float:
        finite = self.values[~self.values.isnan()].abs()
        return float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0


def label(token: str) -> str:
    """A printable label for a decoded token: whitespace made visible, never empty."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not text.strip():
        return repr(token)[1:-1].replace(" ", "\u2423") or "''"
    return text


def heatmap(out: AttributionTensors, *, row: int = 0) -> Heatmap:
    """The matrix of batch row `row` of `out`, padding removed, `*extra` dims summed."""
    if not 0 <= row < out.source.shape[0]:
        n = out.source.shape[0]
        raise ValueError(f"`row`={row} is outside the batch of {n}: use 0..{n - 1}.")
    if out.extra_dims:
        out = reduce(out, "sum")
    cols = out.step_mask[row].nonzero().squeeze(1)
    steps = out.steps[cols]
    src = out.source_mask[row].nonzero().squeeze(1)
    parts = [out.source[row][cols][:, src].T.double()]
    labels = [out.source_tokens[row][i] for i in src.tolist()]
    if out.target is not None and len(steps):
        last = int(steps.max())
        tgt = (out.target_mask[row] & (torch.arange(out.target_mask.shape[1]) < last)).nonzero().squeeze(1)
        block = out.target[row][cols][:, tgt].T.double()
        block[tgt[:, None] >= steps[None, :]] = math.nan
        parts.append(block)
        labels += [out.target_tokens[row][j] for j in tgt.tolist()]
    title = out.meta.get("method", "attribution")
    if out.source.shape[0] > 1:
        title += f" (row {row})"
    return Heatmap(
        rows=tuple(label(t) for t in labels),
        cols=tuple(label(out.target_tokens[row][int(s)]) for s in steps.tolist()),
        values=torch.cat(parts), n_source=len(src), title=title,
        step_scores=_step_rows(out, row, cols),
    )


def _step_rows(out: AttributionTensors, row: int, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step scores, then the completeness error where the method has one (IG: sum of scores
    minus f(input) - f(baseline); large values mean more `n_steps` are needed)."""
    rows = {k: v[row][cols].double() for k, v in out.step_scores.items()}
    if out.delta is not None:
        rows["delta"] = out.delta[row][cols].double()
    return rows


def heatmaps(out: AttributionTensors) -> list[Heatmap]:
    return [heatmap(out, row=r) for r in range(out.source.shape[0])]


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
    return 0 if -2 <= e <= 2 else e


def _fmt(value: float, exponent: int) -> str:
    return "" if math.isnan(value) else f"{value / 10 ** exponent:.2f}"


# ---- terminal ------------------------------------------------------------------------------

def table(hm: Heatmap):
    """A rich Table of `hm`: coloured score cells, then one row per step score."""
    from rich.table import Table
    from rich.text import Text

    exp, vmax, signed = _scale(hm.vmax), hm.vmax, hm.signed
    caption = f"scores x 1e{exp}" if exp else None
    grid = Table(title=hm.title, caption=caption, show_lines=False, pad_edge=False)
    grid.add_column("", style="bold", no_wrap=True)
    for col in hm.cols:
        grid.add_column(col, justify="right", no_wrap=True)
    for i, name in enumerate(hm.rows):
        cells = []
        for v in hm.values[i].tolist():
            bg = rgb(v, vmax, signed=signed)
            style = "" if math.isnan(v) else f"{_ink(bg)} on rgb({bg[0]},{bg[1]},{bg[2]})"
            cells.append(Text(_fmt(v, exp), style=style))
        grid.add_row(Text(name, style="dim" if i >= hm.n_source else ""), *cells,
                     end_section=i == len(hm.rows) - 1)
    for name, scores in hm.step_scores.items():
        grid.add_row(Text(name, style="italic"), *(f"{v:.3g}" for v in scores.tolist()))
    return grid


def console(out: AttributionTensors, *, file=None, width: int | None = None) -> None:
    """Print every batch row of `out` as a coloured table (to `file`, default stdout)."""
    from rich.console import Console

    file = file or sys.stdout
    if width is None and not (hasattr(file, "isatty") and file.isatty()):
        width = 1000  # a pipe or file: never truncate cells to a guessed 80 columns
    con = Console(file=file, width=width)
    for hm in heatmaps(out):
        con.print(table(hm))


# ---- HTML ----------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:1em}
table.fa{border-collapse:collapse;margin:1em 0;font-size:13px}
table.fa th,table.fa td{border:1px solid #ddd;padding:2px 6px;white-space:pre;text-align:right}
table.fa th.row{text-align:left}table.fa tr.tgt th.row{color:#666}
table.fa tr.score td{background:#f5f5f5;font-style:italic}
.legend{display:flex;align-items:center;gap:6px;font-size:12px}
.legend .bar{width:200px;height:12px;border:1px solid #999}"""


def _legend(hm: Heatmap) -> str:
    lo, mid = (-hm.vmax, "#ffffff") if hm.signed else (0.0, "#ff8080")
    start = "#0000ff" if hm.signed else "#ffffff"
    return (f'<div class="legend"><span>{lo:.3g}</span><span class="bar" style="background:'
            f'linear-gradient(to right,{start},{mid},#ff0000)"></span><span>{hm.vmax:.3g}</span>'
            "<span>score</span></div>")


def _html_table(hm: Heatmap) -> str:
    e = _html.escape
    exp = _scale(hm.vmax)
    head = "".join(f"<th>{e(c)}</th>" for c in hm.cols)
    lines = [f"<h2>{e(hm.title)}</h2>", _legend(hm), '<table class="fa">',
             f"<thead><tr><th></th>{head}</tr></thead>", "<tbody>"]
    for i, name in enumerate(hm.rows):
        cells = []
        for k, v in enumerate(hm.values[i].tolist()):
            colour = rgb(v, hm.vmax, signed=hm.signed)
            tip = "not visible" if math.isnan(v) else f"{v:.6g}"
            cells.append(f'<td style="background:rgb{colour};color:{_ink(colour)}" '
                         f'title="{e(name)} -&gt; {e(hm.cols[k])}: {tip}">{_fmt(v, exp)}</td>')
        kind = "src" if i < hm.n_source else "tgt"
        lines.append(f'<tr class="{kind}"><th class="row">{e(name)}</th>{"".join(cells)}</tr>')
    for name, scores in hm.step_scores.items():
        cells = "".join(f'<td title="{e(name)}: {v:.6g}">{v:.3g}</td>' for v in scores.tolist())
        lines.append(f'<tr class="score"><th class="row">{e(name)}</th>{cells}</tr>')
    lines.append("</tbody></table>")
    if exp:
        lines.append(f"<p>cell values x 1e{exp}; hover a cell for its exact score.</p>")
    return "\n".join(lines)


def html(out: AttributionTensors, *, standalone: bool = True) -> str:
    """Every batch row as an HTML heatmap; `standalone` wraps it in a page with no network assets."""
    body = "\n".join(_html_table(hm) for hm in heatmaps(out))
    if not standalone:
        return f"<div><style>{_CSS}</style>\n{body}\n</div>"
    title = _html.escape(out.meta.get("method", "attribution"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def save_html(out: AttributionTensors, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(html(out))


# ---- PNG -----------------------------------------------------------------------------------

CELL_INCHES = 0.3
MARGIN_INCHES = (2.0, 1.6)  # (left + right, top + bottom) room for labels, colour bar, title


def png_size(n_rows: int, n_cols: int, *, n_scores: int = 0, dpi: int = 100) -> tuple[int, int]:
    """Pixel (width, height) of the PNG for a heatmap of `n_rows` x `n_cols` (+ step score rows)."""
    w = max(4.0, n_cols * CELL_INCHES + MARGIN_INCHES[0] + 1.0)
    h = max(3.0, (n_rows + n_scores) * CELL_INCHES + MARGIN_INCHES[1] + 0.6)
    return round(w * dpi), round(h * dpi)


def save_png(out: AttributionTensors, path: str | os.PathLike, *, row: int = 0, dpi: int = 100) -> None:
    """A matplotlib heatmap of batch row `row`: tokens on both axes, colour bar, step scores."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    hm = heatmap(out, row=row)
    n_r, n_c, n_s = len(hm.rows), len(hm.cols), len(hm.step_scores)
    w, h = png_size(n_r, n_c, n_scores=n_s, dpi=dpi)
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    font = 7 if max(n_r, n_c) > 20 else 9
    heights = [n_r] + ([n_s] if n_s else [])
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[40, 1],
                            left=1.6 / (w / dpi), right=1 - 0.9 / (w / dpi),
                            top=1 - 1.2 / (h / dpi), bottom=0.3 / (h / dpi), hspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    cmap = matplotlib.colormaps["RdBu_r" if hm.signed else "Reds"].with_extremes(bad="#eeeeee")
    lo = -hm.vmax if hm.signed else 0.0
    image = ax.imshow(hm.values.numpy(), cmap=cmap, vmin=lo, vmax=hm.vmax, aspect="auto")
    ax.set_yticks(range(n_r), hm.rows, fontsize=font)
    ax.set_xticks(range(n_c), hm.cols, fontsize=font, rotation=90)
    ax.xaxis.tick_top()
    if n_r > hm.n_source:
        ax.axhline(hm.n_source - 0.5, color="black", linewidth=0.8)
    ax.set_title(hm.title, fontsize=font + 2, pad=4)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]))
    if n_s:
        sax = fig.add_subplot(grid[1, 0], sharex=ax)
        scores = torch.stack(list(hm.step_scores.values())).numpy()
        sax.imshow(scores, cmap="Greys", aspect="auto", alpha=0.35)
        for (i, k), v in zip(((i, k) for i in range(n_s) for k in range(n_c)), scores.flat):
            sax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=font - 2)
        sax.set_yticks(range(n_s), list(hm.step_scores), fontsize=font)
        sax.tick_params(axis="x", bottom=False, labelbottom=False, top=False, labeltop=False)
    fig.savefig(os.fspath(path), dpi=dpi, format="png")


# ---- notebook or terminal --------------------------------------------------------------------

def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def show(out: AttributionTensors) -> None:
    """HTML in a Jupyter notebook, a coloured table in a terminal."""
    if _in_notebook():
        from IPython.display import HTML, display
        display(HTML(html(out, standalone=False)))
    else:
        console(out)

"""Views of a `fnattr.compare.Comparison`: a rich table, the console, a PNG of the curves."""

import os
import pathlib
import sys
from collections.abc import Sequence

import torch

from fnattr.evaluate import metrics as ev
from fnattr.evaluate.compare_result import check_outputs
from fnattr.evaluate.compare_result import LEVEL, Comparison, Estimate


def _chance_rows(comp: Comparison, metrics: Sequence[str]) -> list[str]:
    """The methods whose chance level to show: the first alone where every method's random
    rankings scored the same (they do when the methods can lose the same tokens), else each."""
    have = [m for m in comp.methods if all(k in comp.chance_per_example[m] for k in metrics)]
    same = all(torch.allclose(comp.chance_per_example[m][k], comp.chance_per_example[have[0]][k],
                              rtol=1e-9, atol=1e-12) for m in have for k in metrics)
    return have[:1] if same else have


def _cell(e: Estimate) -> str:
    return f"{e.mean:.3g} [{e.low:.3g}, {e.high:.3g}]"


def _caption(comp: Comparison, by: str) -> list[str]:
    m = comp.meta
    up = [k for k in comp.metrics if ev.HIGHER_IS_BETTER[k]]
    down = [k for k in comp.metrics if not ev.HIGHER_IS_BETTER[k]]
    fractions = ", ".join(f"{q:g}" for q in m["fractions"])
    reductions = ", ".join(f"{k} {v}" for k, v in m["reduction"].items())
    better = [*(["\u2191 higher is better: " + ", ".join(up)] if up else []),
              *(["\u2193 lower is better: " + ", ".join(down)] if down else [])]
    aopc = [k for k in comp.metrics if k in ("comprehensiveness", "sufficiency")]
    auc = [k for k in comp.metrics if k in ("deletion", "insertion")]
    areas = [*([f"AOPC (mean over fractions {fractions}) for {' and '.join(aopc)}"] if aopc else []),
             *([f"AUC over {m['curve_levels'] + 1} levels (0 to 1) of the {' and '.join(auc)} "
                "curve" + "s" * (len(auc) > 1)] if auc else [])]
    lines = [
        f"per example: {', '.join(areas)}, averaged over the example's generated steps",
        (f"cells: mean over {len(comp.ids)} examples [{LEVEL:.0%} percentile bootstrap interval, "
         f"{comp.n_boot} resamples, seed {comp.seed}]; ranked by {by}"),
        (f"target: {m['target_fn']}; targets {m['targets']}; removal: {m['removal']}; tokens "
         f"ranked per {m['ranking']} by the {m['sign']} score, extra dims reduced by {reductions}"),
        "; ".join(better),
    ]
    if m["n_random"]:
        lines.append(f"chance: {m['n_random']} random ranking{'s' * (m['n_random'] > 1)}, "
                     "the same metrics")
    return lines


def table(comp: Comparison, *, by: str | None = None):
    """A rich table of `comp`, best first by metric `by` (default: the first metric): per metric
    the mean and [low, high], then the chance level; the caption says what the numbers are.
    Every text is a rich `Text`, never markup."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    by = comp.metrics[0] if by is None else by
    if by not in comp.metrics:
        raise ValueError(f"`by`={by!r}: rank by one of {list(comp.metrics)}.")
    n = len(comp.methods)
    grid = Table(title=Text(f"faithfulness of {n} method{'s' * (n > 1)}, ranked by {by}",
                            style="bold"), pad_edge=False)
    grid.add_column(Text("#"), justify="right")
    grid.add_column(Text("method"), no_wrap=True)
    for k in comp.metrics:
        grid.add_column(Text(f"{k} {'↑' if ev.HIGHER_IS_BETTER[k] else '↓'}"), justify="right",
                        no_wrap=True)
    for rank, m in enumerate(comp.ranking[by], 1):
        grid.add_row(Text(str(rank)), Text(m, style="bold" if rank == 1 else ""),
                     *(Text(_cell(comp.estimates[m][k])) for k in comp.metrics),
                     end_section=rank == len(comp.methods))
    chance = _chance_rows(comp, comp.metrics)
    for m in chance:
        name = "chance" if len(chance) == 1 else f"chance ({m})"
        grid.add_row(Text("-"), Text(name, style="italic"),
                     *(Text(_cell(comp.chance[m][k]) if k in comp.chance[m] else "", style="dim")
                       for k in comp.metrics))
    return Group(grid, *(Text(line, style="dim") for line in _caption(comp, by)))


def console(comp: Comparison, *, by: str | None = None, file=None, width: int | None = None) -> None:
    """Print `table(comp, by=by)` (to `file`, default stdout; a pipe gets full-width lines)."""
    from rich.console import Console

    file = file or sys.stdout
    if width is None and not (hasattr(file, "isatty") and file.isatty()):
        width = 1000
    Console(file=file, width=width).print(table(comp, by=by))


def plot_curves(comp: Comparison, path: str | os.PathLike, *, overwrite: bool = False,
                dpi: int = 100):
    """Write a PNG of the mean deletion and insertion curves (`Comparison.curve`): two panels,
    fraction on x, the target on y, one line per method, the random rankings dashed. Every text
    is drawn literally (mathtext and TeX off). Returns the matplotlib Figure."""
    missing = [k for k in ("deletion", "insertion") if k not in comp.metrics]
    if missing:
        raise ValueError(f"`comp` holds no {' or '.join(missing)} curve: compare with those metrics.")
    check_outputs([path], overwrite=overwrite)
    import matplotlib  # and no pyplot: no GUI backend, no global figure state
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig = Figure(figsize=(11, 4.8), dpi=dpi, layout="constrained")
        colours = matplotlib.colormaps["tab10"]
        for ax, name in zip(fig.subplots(1, 2), ("deletion", "insertion")):
            x = comp.results[comp.methods[0]].levels.numpy()
            for i, m in enumerate(comp.methods):
                ax.plot(x, comp.curve(m, name).numpy(), color=colours(i % 10),
                        label=f"{m} (AUC {comp.estimates[m][name].mean:.3g})")
            chance = _chance_rows(comp, (name,))
            same = len(chance) == 1
            for m in chance:
                ax.plot(x, comp.curve(m, name, random=True).numpy(), linestyle="--",
                        color="grey" if same else colours(comp.methods.index(m) % 10),
                        label="random ranking" if same else f"random ranking ({m})")
            better = "higher" if ev.HIGHER_IS_BETTER[name] else "lower"
            ax.set_title(f"{name} ({better} AUC is better)")
            ax.set_xlabel("fraction of tokens " + ("removed" if name == "deletion" else "inserted")
                          + ", highest-ranked first")
            ax.set_ylabel(f"{comp.meta['target_fn']} (mean over steps, then examples)")
            ax.legend(fontsize=8)
        fig.suptitle(f"{len(comp.ids)} examples; removal: {comp.meta['removal']}", fontsize=10)
        for text in fig.findobj(Text):
            text.set_parse_math(False)
            text.set_usetex(False)
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(os.fspath(path), dpi=dpi, format="png")
    return fig

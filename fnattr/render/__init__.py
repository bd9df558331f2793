"""Draw a result: a rich table in the terminal, standalone HTML, a PNG heatmap, a step plot.

`views` says what a heatmap shows (the reduction of each method's extra dims, normalisation, the
baseline, the unconverged steps) and `convergence` reads a path method's completeness; `draw`
turns those matrices into tables and pictures.
"""

from fnattr.render.draw import (
    CELL_INCHES as CELL_INCHES,
    LABEL_CHARS as LABEL_CHARS,
    MARGIN_INCHES as MARGIN_INCHES,
    NAN_COLOUR as NAN_COLOUR,
    NAN_TIP as NAN_TIP,
    NOTE_INCHES as NOTE_INCHES,
    NOTE_LINES as NOTE_LINES,
    NOTEBOOK_ROWS as NOTEBOOK_ROWS,
    console as console,
    figure as figure,
    hidden as hidden,
    html as html,
    png_size as png_size,
    rgb as rgb,
    save_html as save_html,
    save_png as save_png,
    show as show,
    step_plot as step_plot,
    table as table,
)
from fnattr.render.views import Heatmap as Heatmap
from fnattr.render.views import heatmap as heatmap
from fnattr.render.views import heatmaps as heatmaps
from fnattr.render.views import label as label
from fnattr.render.views import visible as visible

__all__ = ["Heatmap", "console", "figure", "heatmap", "heatmaps", "html", "label", "save_html",
           "save_png", "show", "step_plot", "table", "visible"]

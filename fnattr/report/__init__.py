"""An interactive report in one self-contained HTML file: scripts, styles and data inlined, no
network, opens from `file://` in any browser.

- a result (`AttributionTensors` or its `.safetensors` file): the prompt and the generated text as
  running text; hovering or clicking a generated token (or the arrow keys) colours the source and
  earlier generated tokens by that step's scores, with the views' caption and the full heatmap
  on a toggle;
- several results of the same examples, or an `fnattr evaluate` folder: the methods side by
  side, with the per-step score plot and the faithfulness figures;
- a dataset run folder: a searchable, sortable list of its rows; each row's view is stored
  compressed (zlib, base64) and drawn when opened.

>>> fnattr.report.write(out, "report.html")            # or out.report("report.html")
>>> fnattr.report.write("runs/facts", "facts.html")     # a dataset run
>>> fnattr.report.write(["ig.safetensors", "occ.safetensors", "out/evaluate"], "cmp.html")
"""

import base64
import html
import importlib.resources
import os
import pathlib
import zlib
from typing import Any

from fnattr.report.build import dumps, gather

__all__ = ["gather", "page", "report", "write"]

# No request can leave the page: everything it needs is inline.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data:; base-uri 'none'; form-action 'none'")


def _asset(name: str) -> str:
    text = importlib.resources.files("fnattr.report").joinpath("assets", name).read_text("utf-8")
    if any(bad in text.lower() for bad in ("</script", "</style", "<script", "<!--")):
        raise RuntimeError(f"assets/{name} holds markup that would end or change its element")
    return text


def _pack(value: Any) -> str:
    """`value` as zlib-compressed JSON in base64 (the page inflates it with DecompressionStream)."""
    return base64.b64encode(zlib.compress(dumps(value).encode("utf-8"), 6)).decode("ascii")


def page(data: dict[str, Any]) -> str:
    """The HTML of the report of `data` (`gather`)."""
    shell = {**{k: v for k, v in data.items() if k != "details"},
             "details": [_pack(d) for d in data["details"]]}
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(data['title'])}</title>\n<style>{_asset('report.css')}</style>\n"
        '</head><body><main id="app"><h1 id="title">'
        f"{html.escape(data['title'])}</h1><noscript><p>This report needs JavaScript.</p>"
        "</noscript></main>\n"
        f'<script type="application/json" id="fnattr-data">{dumps(shell)}</script>\n'
        f"<script>{_asset('report.js')}</script>\n</body></html>\n")


def write(inputs: Any, out: str | os.PathLike = "report.html", *, reduction: str | None = None,
          normalize: bool = False, title: str | None = None) -> pathlib.Path:
    """Write the report of `inputs` to `out` and return its path.

    `inputs`: an `AttributionTensors`, a path (a result `.safetensors` file, a dataset run folder,
    an `fnattr evaluate` folder), a `Comparison`, a {name: AttributionTensors} mapping, or a
    list of them (several results side by side, with at most one evaluation). `reduction` and
    `normalize`: as in `fnattr.views.view` (default: the method's reduction, not normalised)."""
    text = page(gather(inputs, reduction=reduction, normalize=normalize, title=title))
    path = pathlib.Path(out)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


report = write  # `fnattr.report.report(x, "x.html")` reads as well

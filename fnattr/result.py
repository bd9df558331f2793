"""AttributionTensors: the result of every method, saved and loaded as safetensors."""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int, TypeCheckError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fnattr._check import typechecked

FORMAT = "fnattr.attribution/1"


@typechecked
@dataclasses.dataclass(frozen=True)
class AttributionTensors:
    """Scores of every attributed step over source tokens (and earlier target tokens).

    - `source[b, k, i, ...]`: score of source token i for attributed step k.
    - `target[b, k, j, ...]`: score of target token j (an earlier generated token) for step k;
      exactly 0 where j >= step (the model cannot see it). None when the target side is not
      attributed (encoder-decoder models without `attribute_target=True`).
    - `steps[k]`: which target position step k predicts (`attr_pos_start` .. `attr_pos_end`).
    - `step_scores[name][b, k]`: per-step scores, the attributed target function's among them.
    - `delta[b, k]`: completeness error, for methods that have one (IG: sum of scores minus
      f(input) - f(baseline)).
    - `extra_dims`: names of the trailing `*extra` dimensions, e.g. ("hidden",).
    Padding positions carry score 0; `source_mask` / `target_mask` say which are real.
    """

    source: Float[Tensor, "batch step src *extra"]
    target: Float[Tensor, "batch step tgt *extra"] | None
    steps: Int[Tensor, " step"]
    step_scores: dict[str, Float[Tensor, "batch step"]]
    source_ids: Int[Tensor, "batch src"]
    target_ids: Int[Tensor, "batch tgt"]
    source_mask: Bool[Tensor, "batch src"]
    target_mask: Bool[Tensor, "batch tgt"]
    source_tokens: tuple[tuple[str, ...], ...]
    target_tokens: tuple[tuple[str, ...], ...]
    extra_dims: tuple[str, ...] = ()
    delta: Float[Tensor, "batch step"] | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    # feature groups of the batch (`prepare(groups=...)`, `fnattr.groups`): the group of each
    # source token (-1: none) and each row's group texts; `grouped()` reduces to them
    source_groups: Int[Tensor, "batch src"] | None = None
    group_texts: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        extra = self.source.ndim - 3
        if len(self.extra_dims) != extra:
            raise ValueError(f"`extra_dims` names {len(self.extra_dims)} dims but scores have {extra}.")
        if self.target is not None and self.target.shape[3:] != self.source.shape[3:]:
            raise ValueError("`target` and `source` must share their extra dimensions.")
        for side in ("source", "target"):  # a heatmap labels each id with its token
            tokens, (rows, width) = getattr(self, f"{side}_tokens"), getattr(self, f"{side}_ids").shape
            if len(tokens) != rows or any(len(row) != width for row in tokens):
                raise ValueError(f"`{side}_tokens` has {len(tokens)} rows of "
                                 f"{sorted({len(r) for r in tokens})[:4]} tokens but `{side}_ids` is "
                                 f"{rows} x {width}: give one token per id.")

        if (self.source_groups is None) != (self.group_texts is None) or (
                self.group_texts is not None and (
                    len(self.group_texts) != self.source_groups.shape[0] or any(
                        int(g.max()) >= len(t) for g, t in zip(self.source_groups, self.group_texts)
                        if g.numel()) or bool((self.source_groups < -1).any()))):
            raise ValueError("`source_groups` and `group_texts` go together: one text per group "
                             "index of each row (indices -1 .. n_groups - 1).")

    @property
    def step_mask(self) -> Bool[Tensor, "batch step"]:
        """True where step k of row b is a real (not padding) target token."""
        return self.target_mask[:, self.steps]

    def replace(self, **changes: Any) -> "AttributionTensors":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        """Write tensors and metadata to a `.safetensors` file (no pickle)."""
        save(self, path)

    def grouped(self, by: Any = None, *, reduction: str | Callable | None = None
                ) -> "AttributionTensors":
        """One score per source group (`fnattr.groups.grouped`): the sum of the group's token
        scores, or their L2 norm for gradient magnitudes; `by` regroups by a splitter name."""
        from fnattr.groups import grouped  # groups imports this module

        return grouped(self, by, reduction=reduction)

    def citations(self, k: int = 3, *, by: Any = None, row: int = 0) -> list:
        """For each generated sentence of row `row`: its text and the top-`k` source groups
        (score, text) by the sentence's summed scores (`fnattr.context.cited`)."""
        from fnattr.context.cited import citations

        return citations(self, k=k, by=by, row=row)

    def show(self, *, reduction: str | Callable | None = None, normalize: bool = False,
             group_by: Any = None) -> None:
        """Display the heatmap: HTML in a Jupyter notebook, a coloured table in a terminal.

        `reduction` of the extra dims (default: by method, `fnattr.views.DEFAULT_REDUCTION`);
        `normalize`: divide each step by the sum of its absolute scores; `group_by`: one row
        per source group (`grouped`)."""
        from fnattr.render import show  # render imports this module

        show(self, reduction=reduction, normalize=normalize, group_by=group_by)

    def report(self, path: str | os.PathLike = "report.html", **options: Any) -> str:
        """Write an interactive, self-contained HTML report of this result to `path` (see
        `fnattr.report.write`; `options`: `reduction`, `normalize`, `title`); returns the path."""
        from fnattr.report import write  # the report imports this module

        return os.fspath(write(self, path, **options))

    def __repr__(self) -> str:
        """What the result holds, not its numbers (`out.source` has them; `out.show()` draws them):
        method, shapes, and the first rows' tokens."""
        shape = lambda t: "None" if t is None else "x".join(map(str, t.shape))  # noqa: E731
        dims = " ".join(("batch", "step", "src", *self.extra_dims))
        return (f"AttributionTensors(method={self.meta.get('method')!r}, "
                f"target_fn={self.meta.get('target_fn')!r}, source[{dims}]={shape(self.source)}, "
                f"target={shape(self.target)}, step_scores={list(self.step_scores)}, "
                f"delta={shape(self.delta)}, tokens={_tokens_repr(self)})")

    def _repr_html_(self) -> str:
        """The HTML heatmap in a notebook (Jupyter calls this): the first rows, escaped."""
        from fnattr.render import NOTEBOOK_ROWS, html  # render imports this module

        return html(self, standalone=False, max_rows=NOTEBOOK_ROWS)


REPR_ROWS, REPR_CHARS = 2, 40  # rows and characters per side that `repr` shows


def _text(tokens: tuple[str, ...], mask: Tensor) -> str:
    text = "".join(t for t, real in zip(tokens, mask.tolist()) if real)
    return text if len(text) <= REPR_CHARS else text[:REPR_CHARS - 1] + "\u2026"


def _tokens_repr(out: AttributionTensors) -> str:
    """`['source' -> 'target', ...]` of the first `REPR_ROWS` rows, padding dropped, shortened."""
    rows = [f"{_text(s, sm)!r} -> {_text(t, tm)!r}" for s, t, sm, tm in zip(
        out.source_tokens[:REPR_ROWS], out.target_tokens[:REPR_ROWS], out.source_mask, out.target_mask)]
    more = len(out.source_tokens) - len(rows)
    return "[" + ", ".join(rows + ([f"... {more} more"] if more > 0 else [])) + "]"


_TENSORS = ("source", "target", "steps", "source_ids", "target_ids", "source_mask",
            "target_mask", "delta", "source_groups")


def save(result: AttributionTensors, path: str | os.PathLike) -> None:
    """Write `result` to `path` as safetensors; tokens and metadata go in the header."""
    tensors = {k: getattr(result, k) for k in _TENSORS if getattr(result, k) is not None}
    tensors |= {f"step_scores.{k}": v for k, v in result.step_scores.items()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "source_tokens": json.dumps(result.source_tokens),
        "target_tokens": json.dumps(result.target_tokens),
        "extra_dims": json.dumps(result.extra_dims),
        "step_score_names": json.dumps(list(result.step_scores)),
        "meta": json.dumps(result.meta),
    }
    if result.group_texts is not None:
        header["group_texts"] = json.dumps(result.group_texts)
    save_file(tensors, os.fspath(path), metadata=header)


# Limits on what a file's header may hold: beyond them it is refused on load, never drawn.
MAX_TOKEN_CHARS = 10_000  # one token (a merged word or span)
MAX_SHOWN_CHARS = 1_000  # a meta value drawn in a title or caption (`_SHOWN`)
MAX_META_CHARS = 16 * 2**20  # any other meta value (JSON records such as `completeness`)
MAX_JSON_DEPTH = 32  # nesting of any JSON text in the header
_SHOWN = ("method", "target_fn", "model", "model_class", "baseline", "baseline_kind")
_REQUIRED = ("source", "steps", "source_ids", "target_ids", "source_mask", "target_mask")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


class _Damaged(Exception):
    """What is wrong with a file, in words; `load` names the file."""


def _unreadable(path: str | os.PathLike, error: Exception | str) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is damaged or not an fnattr result ({error}).")


def _header(path: str | os.PathLike, f: Any) -> Mapping[str, str]:
    header: Mapping[str, str] = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an fnattr result (format {header.get('format')!r}).")
    return header


def _depth(text: str) -> int:
    """How deeply the JSON `text` nests, counted without parsing it (no recursion)."""
    depth = top = 0
    for c in re.findall(r"[\[\]{}]", _STRINGS.sub("", text)):
        depth += 1 if c in "[{" else -1
        top = max(top, depth)
    return top


def _json(header: Mapping[str, str], field: str) -> Any:
    if field not in header:
        raise _Damaged(f"header field {field!r} is missing")
    if _depth(header[field]) > MAX_JSON_DEPTH:
        raise _Damaged(f"header field {field!r} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(header[field])
    except json.JSONDecodeError as error:
        raise _Damaged(f"header field {field!r} is not JSON: {error}") from None


def _strings(value: Any, field: str, *, levels: int) -> Any:
    """`value` checked to be a list of strings (`levels`=1) or of lists of strings (2)."""
    rows = value if levels == 2 and isinstance(value, list) else [value]
    if not all(isinstance(r, list) and all(isinstance(t, str) for t in r) for r in rows):
        kind = "a list of lists of strings" if levels == 2 else "a list of strings"
        raise _Damaged(f"header field {field!r} is not {kind}")
    return value


def _meta(header: Mapping[str, str]) -> dict[str, str]:
    meta = _json(header, "meta")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Damaged("header field 'meta' is not a JSON object of strings")
    for key, value in meta.items():
        limit = MAX_SHOWN_CHARS if key in _SHOWN else MAX_META_CHARS
        if len(value) > limit:
            raise _Damaged(f"meta[{key!r}] has {len(value)} characters, more than {limit}")
        if value[:1] in ("[", "{") and _depth(value) > MAX_JSON_DEPTH:
            raise _Damaged(f"meta[{key!r}] nests deeper than {MAX_JSON_DEPTH} levels")
    return meta


def _check_tensors(t: Mapping[str, Tensor], names: list[str]) -> None:
    """Every tensor present, of its kind, and of the shape `source` implies."""
    for name in _REQUIRED:
        if name not in t:
            raise _Damaged(f"tensor {name!r} is missing")
    known = {*_TENSORS, *(f"step_scores.{n}" for n in names)}
    for name in sorted(set(t) - known):
        raise _Damaged(f"tensor {name!r} is not part of a result (nor in 'step_score_names')")
    if t["source"].ndim < 3:
        raise _Damaged(f"tensor 'source' has {t['source'].ndim} dims; it needs [batch step src ...]")
    b, k, s = t["source"].shape[:3]
    n_tgt = t["target_ids"].shape[-1] if t["target_ids"].ndim == 2 else -1
    extra = tuple(t["source"].shape[3:])
    shapes = {"steps": (k,), "source_ids": (b, s), "source_mask": (b, s), "target_ids": (b, n_tgt),
              "target_mask": (b, n_tgt), "delta": (b, k), "target": (b, k, n_tgt, *extra),
              "source_groups": (b, s),
              **{f"step_scores.{n}": (b, k) for n in names}}
    for name, shape in shapes.items():
        if name in t and tuple(t[name].shape) != shape:
            raise _Damaged(f"tensor {name!r} has shape {tuple(t[name].shape)}; 'source' "
                           f"{tuple(t['source'].shape)} implies {shape}")
    for name, x in t.items():
        kind = ("bool" if name.endswith("_mask") else "integer" if name in ("steps", "source_ids",
                "target_ids", "source_groups") else "floating point")
        ok = {"bool": x.dtype == torch.bool, "floating point": x.is_floating_point(),
              "integer": not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool}
        if not ok[kind]:
            raise _Damaged(f"tensor {name!r} is {str(x.dtype).removeprefix('torch.')}, not {kind}")
    steps = t["steps"]
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= n_tgt):
        raise _Damaged(f"tensor 'steps' holds {steps.tolist()[:8]}, outside the {n_tgt} target "
                       "positions")
    for name in ("source_ids", "target_ids"):
        if t[name].numel() and int(t[name].min()) < 0:
            raise _Damaged(f"tensor {name!r} holds negative token ids")


def _parts(header: Mapping[str, str], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The fields of the result in `header` and `tensors`, each checked against the others."""
    names = _strings(_json(header, "step_score_names"), "step_score_names", levels=1)
    if len(set(names)) != len(names):
        raise _Damaged("header field 'step_score_names' repeats a name")
    for n in names:
        if f"step_scores.{n}" not in tensors:
            raise _Damaged(f"step score {n!r} has no tensor 'step_scores.{n}'")
    _check_tensors(tensors, names)
    extra_dims = _strings(_json(header, "extra_dims"), "extra_dims", levels=1)
    if len(extra_dims) != tensors["source"].ndim - 3:
        raise _Damaged(f"header field 'extra_dims' names {len(extra_dims)} dims; 'source' has "
                       f"{tensors['source'].ndim - 3}")
    parts = {"step_scores": {n: tensors[f"step_scores.{n}"] for n in names},
             "extra_dims": tuple(extra_dims), "meta": _meta(header)}
    for side in ("source", "target"):
        field, shape = f"{side}_tokens", tuple(tensors[f"{side}_ids"].shape)
        rows = _strings(_json(header, field), field, levels=2)
        if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
            raise _Damaged(f"header field {field!r} does not match tensor '{side}_ids' {shape}: "
                           f"{len(rows)} rows of {sorted({len(r) for r in rows})[:4]} tokens")
        if any(len(tok) > MAX_TOKEN_CHARS for r in rows for tok in r):
            raise _Damaged(f"header field {field!r} has a token of more than {MAX_TOKEN_CHARS} characters")
        parts[field] = tuple(tuple(r) for r in rows)
    if ("group_texts" in header) != ("source_groups" in tensors):
        raise _Damaged("header field 'group_texts' and tensor 'source_groups' come together")
    if "group_texts" in header:
        rows = _strings(_json(header, "group_texts"), "group_texts", levels=2)
        if any(len(t) > MAX_META_CHARS for r in rows for t in r):
            raise _Damaged(f"header field 'group_texts' has a text of more than {MAX_META_CHARS} characters")
        parts["group_texts"] = tuple(tuple(r) for r in rows)
    return parts


def load_meta(path: str | os.PathLike) -> dict[str, str]:
    """The `meta` of the result saved in `path`, read from its header alone (no tensors)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return _meta(_header(path, f))
    except (SafetensorError, _Damaged) as error:
        raise _unreadable(path, error) from None


def load(path: str | os.PathLike) -> AttributionTensors:
    """Read an `AttributionTensors` written by `save` (safetensors: never unpickles).

    The whole header is checked against the tensors (fields, kinds, shapes, steps, and the
    `MAX_*` limits above): a damaged, truncated or hostile file raises one ValueError that names
    it and the field."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = _header(path, f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        parts = _parts(header, tensors)
        return AttributionTensors(**{k: tensors.get(k) for k in _TENSORS}, **parts)
    except (SafetensorError, _Damaged) as error:
        raise _unreadable(path, error) from None
    except (TypeCheckError, ValueError) as error:  # a case the checks above miss: its first line
        raise _unreadable(path, str(error).strip().splitlines()[0]) from None

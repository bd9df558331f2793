"""AttributionTensors: the result of every method, saved and loaded as safetensors."""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from jaxtyping import Bool, Float, Int
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

    def __post_init__(self) -> None:
        extra = self.source.ndim - 3
        if len(self.extra_dims) != extra:
            raise ValueError(f"`extra_dims` names {len(self.extra_dims)} dims but scores have {extra}.")
        if self.target is not None and self.target.shape[3:] != self.source.shape[3:]:
            raise ValueError("`target` and `source` must share their extra dimensions.")

    @property
    def step_mask(self) -> Bool[Tensor, "batch step"]:
        """True where step k of row b is a real (not padding) target token."""
        return self.target_mask[:, self.steps]

    def replace(self, **changes: Any) -> "AttributionTensors":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        """Write tensors and metadata to a `.safetensors` file (no pickle)."""
        save(self, path)

    def show(self, *, reduction: str | Callable | None = None, normalize: bool = False) -> None:
        """Display the heatmap: HTML in a Jupyter notebook, a coloured table in a terminal.

        `reduction` of the extra dims (default: by method, `fnattr.views.DEFAULT_REDUCTION`);
        `normalize`: divide each step by the sum of its absolute scores."""
        from fnattr.render import show  # render imports this module

        show(self, reduction=reduction, normalize=normalize)

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
            "target_mask", "delta")


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
    save_file(tensors, os.fspath(path), metadata=header)


def _unreadable(path: str | os.PathLike, error: Exception) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is damaged or not an fnattr result ({error}).")


def _header(path: str | os.PathLike, f: Any) -> Mapping[str, str]:
    header: Mapping[str, str] = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an fnattr result (format {header.get('format')!r}).")
    return header


def load_meta(path: str | os.PathLike) -> dict[str, str]:
    """The `meta` of the result saved in `path`, read from its header alone (no tensors)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = _header(path, f)
        meta = json.loads(header["meta"])
    except (SafetensorError, KeyError, json.JSONDecodeError) as error:
        raise _unreadable(path, error) from None
    if not isinstance(meta, dict):
        raise _unreadable(path, ValueError("its meta is not a JSON object"))
    return meta


def load(path: str | os.PathLike) -> AttributionTensors:
    """Read an `AttributionTensors` written by `save` (safetensors: never unpickles).

    A damaged or truncated file raises a ValueError that names it."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = _header(path, f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        names = json.loads(header["step_score_names"])
        tokens = {k: tuple(tuple(row) for row in json.loads(header[k]))
                  for k in ("source_tokens", "target_tokens")}
        parts = {"step_scores": {n: tensors[f"step_scores.{n}"] for n in names},
                 "extra_dims": tuple(json.loads(header["extra_dims"])), "meta": json.loads(header["meta"])}
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise _unreadable(path, error) from None
    return AttributionTensors(**{k: tensors.get(k) for k in _TENSORS}, **parts, **tokens)

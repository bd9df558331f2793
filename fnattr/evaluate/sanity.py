"""Sanity checks for attributions (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
arXiv:1810.03292): the model-parameter randomisation test.

An attribution that explains the model must change when the model's weights are replaced by
random ones. `model_randomization` re-initialises the blocks from the top down
(`fnattr.hooks.randomized`), attributes again at each stage, and reports the Spearman rank
correlation of every (example, step) with the original attributions.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fnattr import aggregate
from fnattr._check import typechecked
from fnattr.aggregate import Reducer
from fnattr.batch import Batch
from fnattr.hooks.randomized import (
    INITS,
    InitFn,
    Tied,
    layer_stack,
    plan,
    randomized,
    resolve_layers,
)
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn
from fnattr.render.views import default_reduction, view

FORMAT = "fnattr.evaluate.sanity/1"

__all__ = ["RandomizationResult", "load", "model_randomization", "spearman"]
Stage = str | nn.Module | Sequence[str | nn.Module]


@typechecked
def spearman(
    a: Float[Tensor, "*rows n"], b: Float[Tensor, "*rows n"], mask: Bool[Tensor, "*rows n"] | None = None,
) -> Float[Tensor, "*rows"]:
    """Spearman rank correlation of `a` and `b` along the last dim, over the entries `mask` keeps.

    Ties get their average rank; the result is the Pearson correlation of the ranks (float64).
    NaN where fewer than 2 entries are kept, where either side's kept entries are all tied, or
    where a kept entry is not finite.

    >>> spearman(torch.tensor([1., 2, 2, 3]), torch.tensor([4., 3, 2, 1]))   # -0.9487
    """
    mask = torch.ones_like(a, dtype=torch.bool) if mask is None else mask
    a, b, mask = torch.broadcast_tensors(a.double(), b.double(), mask)
    finite = (a.isfinite() & b.isfinite()) | ~mask
    ra, rb = _ranks(a, mask), _ranks(b, mask)
    n = mask.sum(-1)
    da = torch.where(mask, ra - (ra * mask).sum(-1, keepdim=True) / n[..., None].clamp(min=1), 0)
    db = torch.where(mask, rb - (rb * mask).sum(-1, keepdim=True) / n[..., None].clamp(min=1), 0)
    den = ((da * da).sum(-1) * (db * db).sum(-1)).sqrt()
    rho = ((da * db).sum(-1) / den.clamp(min=torch.finfo(den.dtype).tiny)).clamp(-1, 1)
    return torch.where((n >= 2) & (den > 0) & finite.all(-1), rho, torch.nan)


def _ranks(x: Tensor, mask: Tensor) -> Tensor:
    """1-based average ranks of the kept entries (the others rank after them)."""
    x = torch.where(mask & x.isfinite(), x, torch.inf).contiguous()
    ordered = x.sort(-1).values
    low = torch.searchsorted(ordered, x, side="left")
    high = torch.searchsorted(ordered, x, side="right")
    return (low + high + 1).double() / 2


@typechecked
@dataclasses.dataclass(frozen=True)
class RandomizationResult:
    """Rank correlations between original and randomised-model attributions, per stage.

    - `stages[s]`: the layer (or "+"-joined layers) stage s adds (cascading) or randomises alone.
    - `randomized[s]`: every layer randomised at stage s.
    - `spearman[s, b, k]`: Spearman correlation of example b's step k (k indexes `steps`) between
      the original attributions and those at stage s, over the tokens the step sees, extra dims
      reduced as `meta["reduction"]` says; NaN for padding steps and undefined correlations.
    - `spearman_abs[s, b, k]`: the same of the absolute values (the paper's two variants).
    """

    stages: tuple[str, ...]
    randomized: tuple[tuple[str, ...], ...]
    spearman: Float[Tensor, "stage batch step"]
    spearman_abs: Float[Tensor, "stage batch step"]
    steps: Int[Tensor, " step"]
    step_mask: Bool[Tensor, "batch step"]
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.stages) == len(self.randomized) == self.spearman.shape[0]:
            raise ValueError(f"{len(self.stages)} `stages`, {len(self.randomized)} `randomized` and "
                             f"{self.spearman.shape[0]} rows of `spearman`: they must match.")

    def mean(self, *, abs: bool = False) -> Float[Tensor, " stage"]:
        """Mean correlation of each stage over the real (example, step) pairs (NaN ignored)."""
        values = self.spearman_abs if abs else self.spearman
        return values.masked_fill(~self.step_mask, torch.nan).nanmean((1, 2))

    def summary(self) -> str:
        """A text table: each stage, what it randomises, mean (min) correlations over real steps."""
        meta, cascading = self.meta, self.meta.get("cascading") == "true"
        order = ("cascading from the top (+: added to the stages above)" if cascading
                 else "one stage at a time")
        width = max([len("stage"), *(len(s) + 2 for s in self.stages)])
        title = (f"model randomization (Adebayo et al. 2018): {meta.get('method', '?')}, target "
                 f"{meta.get('target_fn', '?')}, seed {meta.get('seed', '?')}, {order}")
        what = (f"Spearman of original vs randomised scores ({meta.get('reduction', '?')}), "
                "mean (min) over real steps")
        lines = [title, what, f"{'stage':<{width}}  {'spearman':>15}  {'|spearman|':>15}"]
        for s, name in enumerate(self.stages):
            label = f"{'+ ' if cascading and s else ''}{name}"
            cols = [self._cell(t[s]) for t in (self.spearman, self.spearman_abs)]
            lines.append(f"{label:<{width}}  {cols[0]:>15}  {cols[1]:>15}")
        return "\n".join(lines)

    def _cell(self, values: Tensor) -> str:
        kept = values[self.step_mask & ~values.isnan()]
        return "n/a" if not kept.numel() else f"{kept.mean():.3f} ({kept.min():.3f})"

    def save(self, path: str | os.PathLike) -> None:
        """Write to a `.safetensors` file (no pickle); `fnattr.sanity.load` reads it."""
        tensors = {k: getattr(self, k).detach().cpu().contiguous().clone()
                   for k in ("spearman", "spearman_abs", "steps", "step_mask")}
        header = {"format": FORMAT, "stages": json.dumps(self.stages),
                  "randomized": json.dumps(self.randomized), "meta": json.dumps(self.meta)}
        save_file(tensors, os.fspath(path), metadata=header)


def load(path: str | os.PathLike) -> RandomizationResult:
    """Read a `RandomizationResult` written by `save` (safetensors: never unpickles)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        header: Mapping[str, str] = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not an fnattr sanity result "
                             f"(format {header.get('format')!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    return RandomizationResult(
        stages=tuple(json.loads(header["stages"])),
        randomized=tuple(tuple(s) for s in json.loads(header["randomized"])),
        meta=json.loads(header["meta"]), **tensors)


def _flat(shown: AttributionTensors) -> tuple[Tensor, Tensor]:
    """Reduced scores [batch step n] over source then target tokens, and which ones step k of
    row b sees (real tokens; target tokens before the step; nothing for padding steps)."""
    b, k, src = shown.source.shape
    values, masks = [shown.source], [shown.source_mask[:, None, :].expand(b, k, src)]
    if shown.target is not None:
        tgt = shown.target.shape[2]
        before = torch.arange(tgt, device=shown.steps.device)[None, :] < shown.steps[:, None]
        values.append(shown.target)
        masks.append(shown.target_mask[:, None, :] & before[None].to(shown.target_mask.device))
    mask = torch.cat(masks, -1) & shown.step_mask[..., None]
    return torch.cat(values, -1), mask


def _stages(model: Model, layers: Stage | Sequence[Stage] | None) -> list[tuple[str, ...]]:
    """Each stage as the names of its modules (validated, before the model is touched)."""
    if layers is None:
        return [(name,) for name in layer_stack(model)]
    specs = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    if not specs:
        raise ValueError("`layers` names no stage: pass None (every block, "
                         f"{list(layer_stack(model))}) or module names.")
    return [tuple(name for name, _ in resolve_layers(model, spec)) for spec in specs]


def _method(method: str | Callable) -> Callable:
    if isinstance(method, str):
        from fnattr.methods import METHODS

        if method not in METHODS:
            raise ValueError(f"`method`={method!r} is not a method: use one of {sorted(METHODS)}.")
        return METHODS[method]
    if not callable(method):
        raise TypeError(f"`method` is a {type(method).__name__}: pass a method from fnattr.methods.")
    return method


def _check_options(reduction: str | Reducer | None, init: str | InitFn, options: Mapping | None,
                   method_options: dict[str, Any]) -> dict[str, Any]:
    if isinstance(reduction, str) and reduction not in aggregate.REDUCERS:
        raise ValueError(f"`reduction`={reduction!r}: use one of {sorted(aggregate.REDUCERS)}, a "
                         "function (tensor, dims) -> tensor, or None (the method's default).")
    if isinstance(init, str) and init not in INITS:
        raise ValueError(f"`init`={init!r}: use one of {sorted(INITS)} or a function "
                         "(original, generator) -> tensor.")
    both = sorted(set(options or {}) & set(method_options))
    if both:
        raise ValueError(f"{both} given both in `options` and as keywords: pass each once.")
    return {**(options or {}), **method_options}


def model_randomization(
    model: Model, batch: Batch, method: str | Callable, target_fn: TargetFn = probability, *,
    layers: Stage | Sequence[Stage] | None = None, cascading: bool = True, seed: int = 0,
    init: str | InitFn = "normal", tied: Tied = "raise", reduction: str | Reducer | None = None,
    options: Mapping[str, Any] | None = None, progress: bool = False, **method_options: Any,
) -> RandomizationResult:
    """The model-parameter randomisation test of Adebayo et al. 2018 (arXiv:1810.03292).

    Attributes `batch` with `method` on the model as it is, then once per stage with layers
    randomised (`fnattr.hooks.randomized`, restored after each stage). `layers`: the stages, top
    first; None means every transformer block (`layer_stack(model)`: decoder top to bottom,
    then encoder top to bottom); an item may be a list of modules forming one stage, e.g.
    `[["lm_head", "transformer.ln_f"], *layer_stack(model)]`. `cascading=True` randomises the
    stages cumulatively (stage s: stages 0..s), as the paper's cascading randomisation;
    `cascading=False` randomises each stage alone. `seed`, `init`, `tied`: as `randomized`.
    Extra dims are reduced by `reduction` (default: the method's, `fnattr.views.default_reduction`).
    Method options go in as keywords (`n_steps=4`); ones whose names this function takes itself
    (`seed`, `layers`) go in `options={...}`. `progress` shows a bar on stderr.

    Returns a `RandomizationResult` with `spearman` and `spearman_abs` [stage batch step].

    >>> res = model_randomization(model, batch, "integrated_gradients", n_steps=8)
    >>> print(res.summary())
    """
    fn = _method(method)
    opts = _check_options(reduction, init, options, method_options)
    stages = _stages(model, layers)
    chosen = [tuple(dict.fromkeys(n for st in stages[: s + 1] for n in st)) if cascading else st
              for s, st in enumerate(stages)]
    for names in chosen:  # unknown layers and tied weights raise here, before any work
        plan(model, list(names), tied=tied)
    original = fn(model, batch, target_fn, **opts)
    how = default_reduction(original) if reduction is None else reduction
    shown = view(original, reduction=how)
    ref, mask = _flat(shown)
    rho, rho_abs = [], []
    bar = _bar(progress)
    task = bar.add_task("randomising", total=len(chosen))
    with bar:
        for names in chosen:
            with randomized(model, list(names), seed=seed, init=init, tied=tied):
                out, _ = _flat(view(fn(model, batch, target_fn, **opts), reduction=how))
            rho.append(spearman(ref, out, mask))
            rho_abs.append(spearman(ref.abs(), out.abs(), mask))
            bar.advance(task)
    meta = {"method": original.meta.get("method", getattr(fn, "__name__", repr(fn))),
            "target_fn": original.meta.get("target_fn", getattr(target_fn, "__name__", "")),
            "args": original.meta.get("args", "{}"), "reduction": _reduction_words(shown),
            "cascading": json.dumps(cascading), "seed": str(seed), "tied": tied,
            "init": init if isinstance(init, str) else getattr(init, "__name__", repr(init))}
    return RandomizationResult(
        stages=tuple("+".join(st) for st in stages), randomized=tuple(chosen),
        spearman=torch.stack(rho).cpu(), spearman_abs=torch.stack(rho_abs).cpu(),
        steps=original.steps.cpu(), step_mask=original.step_mask.cpu(), meta=meta)


def _bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def _reduction_words(shown: AttributionTensors) -> str:
    done = json.loads(shown.meta.get("aggregations", "[]"))
    words = [f"{name} over {', '.join(map(str, dims))}" for name, dims in done]
    return "; ".join(words) or "one score per token"

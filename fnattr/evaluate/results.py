"""`Faithfulness`: the result of `fnattr.evaluate`, saved and loaded as safetensors."""

import dataclasses
import json
import os

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fnattr._check import typechecked

FORMAT = "fnattr.faithfulness/1"
METRICS = ("comprehensiveness", "sufficiency", "deletion", "insertion")
# Which way is better: ERASER's comprehensiveness up, sufficiency down; RISE's deletion AUC
# down, insertion AUC up.
HIGHER_IS_BETTER = {"comprehensiveness": True, "sufficiency": False, "deletion": False,
                    "insertion": True}


@typechecked
@dataclasses.dataclass(frozen=True)
class Faithfulness:
    """How faithful an attribution is, per example and generated step.

    - `score[b, k]`: the target function f at the unperturbed input.
    - `comprehensiveness[b, k, q]` = f(x) - f(x without its top-`fractions[q]` tokens);
      `sufficiency[b, k, q]` = f(x) - f(x with only those tokens) (ERASER, arXiv:1911.03429).
    - `deletion[b, k, l]`: f after removing the top-`levels[l]` fraction of the tokens (level 0
      is x); `insertion[b, k, l]`: f with only that fraction present (level 0 has every
      removable token removed) (RISE, arXiv:1806.07421).
    - `random_<metric>[draw, ...]`: the same metric for `draw` random rankings: chance level.
    - `removable[b, k]`: how many tokens step k can lose (the 100 % of its fractions; under
      ranking="example" the example's count); `step_mask`: real (not padding) steps.
    - `meta`: removal, ranking, sign, reduction, target, the attribution's method, the cost.
    A metric that was not asked for is None. Padding steps hold 0.
    """

    score: Float[Tensor, "batch step"]
    steps: Int[Tensor, " step"]
    step_mask: Bool[Tensor, "batch step"]
    removable: Int[Tensor, "batch step"]
    fractions: Float[Tensor, " fraction"]
    levels: Float[Tensor, " level"]
    comprehensiveness: Float[Tensor, "batch step fraction"] | None = None
    sufficiency: Float[Tensor, "batch step fraction"] | None = None
    deletion: Float[Tensor, "batch step level"] | None = None
    insertion: Float[Tensor, "batch step level"] | None = None
    random_comprehensiveness: Float[Tensor, "draw batch step fraction"] | None = None
    random_sufficiency: Float[Tensor, "draw batch step fraction"] | None = None
    random_deletion: Float[Tensor, "draw batch step level"] | None = None
    random_insertion: Float[Tensor, "draw batch step level"] | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this result holds."""
        return tuple(m for m in METRICS if getattr(self, m) is not None)

    def _get(self, name: str, random: bool) -> Tensor:
        if name not in self.metrics:
            raise ValueError(f"`name`={name!r}: this result holds {list(self.metrics)}.")
        values = getattr(self, f"random_{name}" if random else name)
        if values is None:
            raise ValueError(f"no random baseline for {name!r}: evaluate with n_random >= 1.")
        return values

    def area(self, name: str, *, random: bool = False) -> Tensor:
        """One number per step `[batch, step]` (`[draw, batch, step]` with `random`): the AOPC
        (mean over the fractions) for comprehensiveness and sufficiency, the area under the
        curve (trapezoid over `levels`, which span [0, 1]) for deletion and insertion."""
        values = self._get(name, random)
        if name in ("deletion", "insertion"):
            return torch.trapezoid(values, self.levels.to(values), dim=-1)
        return values.mean(-1)

    def chance(self, name: str) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation over the random draws of `area(name)`, `[batch, step]`."""
        draws = self.area(name, random=True)
        return draws.mean(0), draws.std(0, correction=min(1, len(draws) - 1))

    def per_example(self, name: str, *, random: bool = False) -> Tensor:
        """`area(name)` averaged over each example's real steps: `[batch]` (`[draw, batch]`)."""
        mask = self.step_mask.to(self.score)
        return (self.area(name, random=random) * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per metric: `value`, the mean of `area` over all real steps; `random_mean` and
        `random_std`, that mean for the random rankings (its mean and spread over the draws;
        absent without draws); `higher_is_better` (1.0 or 0.0)."""
        mask = self.step_mask.to(self.score)
        out = {}
        for name in self.metrics:
            row = {"value": float((self.area(name) * mask).sum() / mask.sum().clamp(min=1)),
                   "higher_is_better": float(HIGHER_IS_BETTER[name])}
            if getattr(self, f"random_{name}") is not None:
                draws = (self.area(name, random=True) * mask).sum((1, 2)) / mask.sum().clamp(min=1)
                row["random_mean"] = float(draws.mean())
                row["random_std"] = float(draws.std(correction=min(1, len(draws) - 1)))
            out[name] = row
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write to a `.safetensors` file (no pickle)."""
        save(self, path)

    def __repr__(self) -> str:
        b, k = self.score.shape
        return (f"Faithfulness(metrics={list(self.metrics)}, batch={b}, steps={k}, "
                f"removal={self.meta.get('removal_kind')!r}, ranking={self.meta.get('ranking')!r}, "
                f"method={self.meta.get('method')!r})")


_TENSORS = tuple(f.name for f in dataclasses.fields(Faithfulness) if f.name != "meta")


def save(result: Faithfulness, path: str | os.PathLike) -> None:
    """Write `result` to `path` as safetensors; `meta` goes in the header."""
    tensors = {k: getattr(result, k).detach().cpu().contiguous().clone()
               for k in _TENSORS if getattr(result, k) is not None}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "meta": json.dumps(result.meta)})


def load(path: str | os.PathLike) -> Faithfulness:
    """Read a `Faithfulness` written by `save` (safetensors: never unpickles)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not an fnattr faithfulness result (format "
                             f"{header.get('format')!r}): fnattr.load reads attributions.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return Faithfulness(**{k: tensors.get(k) for k in _TENSORS}, meta=json.loads(header["meta"]))

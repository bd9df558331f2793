"""Citations: for each generated sentence, the source groups (documents, sentences) that scored
highest for it, with their scores and texts."""

import dataclasses
from typing import Any

import torch

from fnattr.groups import split_tokens
from fnattr.result import AttributionTensors


@dataclasses.dataclass(frozen=True)
class Citation:
    """A generated span (`text`, target positions `positions` where known) and its top
    `sources`: (score, group text) pairs, highest score first."""

    text: str
    sources: tuple[tuple[float, str], ...]
    positions: tuple[int, ...] = ()

    def __str__(self) -> str:
        lines = [repr(self.text)]
        lines += [f"  [{score:+.4g}] {text!r}" for score, text in self.sources]
        return "\n".join(lines)


def _sentences(out: AttributionTensors, row: int, by: Any) -> list[list[int]]:
    """Target positions of each generated sentence of `row` (from the token texts)."""
    real = out.target_mask[row].nonzero().squeeze(1).tolist()
    return split_tokens(out.target_tokens[row], real, by, row=row)


def _top(scores: torch.Tensor, texts: tuple[str, ...], k: int) -> tuple[tuple[float, str], ...]:
    order = scores.argsort(descending=True, stable=True)[:k]
    return tuple((float(scores[i]), texts[i]) for i in order.tolist())


def citations(out: AttributionTensors, *, k: int = 3, by: Any = None, row: int = 0,
              sentences: Any = "sentences") -> list[Citation]:
    """For each generated sentence of batch row `row`, the `k` source groups of highest score.

    A `context_cite` result has one column per generated span already: its weights rank the
    groups. Any other result is reduced to groups first (`out.grouped(by)`: its own groups, or
    a splitter name), and a sentence's group score is the sum over the sentence's steps.

    >>> for c in out.citations(k=3): print(c)
    """
    if k < 1:
        raise ValueError(f"`k`={k}: cite at least 1 group.")
    if not 0 <= row < out.source.shape[0]:
        raise ValueError(f"`row`={row} is outside the batch of {out.source.shape[0]}.")
    grouped = out.grouped(by)
    n = int(grouped.source_mask[row].sum())
    texts = grouped.source_tokens[row][:n]
    if out.meta.get("method") == "context_cite":
        return [Citation(grouped.target_tokens[row][s], _top(grouped.source[row, s, :n], texts, k))
                for s in grouped.step_mask[row].nonzero().squeeze(1).tolist()]
    cites = []
    steps = grouped.steps.tolist()
    for positions in _sentences(grouped, row, sentences):
        cols = [c for c, p in enumerate(steps) if p in positions and bool(grouped.step_mask[row, c])]
        if not cols:
            continue
        total = grouped.source[row][cols][:, :n].sum(0)
        text = "".join(grouped.target_tokens[row][j] for j in positions).strip()
        cites.append(Citation(text, _top(total, texts, k), tuple(positions)))
    return cites

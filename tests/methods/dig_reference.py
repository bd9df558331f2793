"""A direct, loop-by-loop reading of the DIG interpolation algorithm (Sanyal & Ren 2021, Sec. 2),
one word at a time, with Python lists and sorting: the test oracle for `monotonic_paths`."""

import math

import torch
from torch import Tensor


def monotonic_dims(base: Tensor, w: Tensor, a: Tensor) -> list[bool]:
    """M_a: dimension j is monotonic when a_j lies between w'_j and w_j (both included)."""
    return [min(b, x) <= y <= max(b, x) for b, x, y in zip(base.tolist(), w.tolist(), a.tolist())]


def monotonize(base: Tensor, w: Tensor, a: Tensor, m: int) -> Tensor:
    """c[M_a] = a[M_a]; c[j] = w_j - (1/m) (w_j - w'_j) elsewhere."""
    c = a.clone()
    for j, ok in enumerate(monotonic_dims(base, w, a)):
        if not ok:
            c[j] = w[j] - (1.0 / m) * (w[j] - base[j])
    return c


def neighbours(vocab: Tensor, word: int, k: int) -> list[int]:
    """The k vocabulary words nearest to `word` (Euclidean), nearest first, itself left out."""
    dist = [(math.dist(vocab[word].tolist(), vocab[v].tolist()), v)
            for v in range(len(vocab)) if v != word]
    return [v for _, v in sorted(dist)[:k]]


def next_anchor(vocab: Tensor, base: Tensor, word: int | None, on_path: list[int], m: int,
                k: int, strategy: str) -> int | None:
    """AnchorSearch from the anchor word `word`; None stands for the baseline."""
    if word is None:
        return None
    scored = []
    for rank, v in enumerate(neighbours(vocab, word, k)):
        if torch.equal(vocab[v], base) or v in on_path:
            continue
        if strategy == "greedy":
            cost = math.dist(vocab[v].tolist(), monotonize(base, vocab[word], vocab[v], m).tolist())
        else:
            cost = -sum(monotonic_dims(base, vocab[word], vocab[v]))
        scored.append((cost, rank, v))
    return min(scored)[2] if scored else None


def dig_path(vocab: Tensor, base: Tensor, word: int, m: int, k: int,
             strategy: str, step: int | None = None) -> tuple[list[Tensor], list[int]]:
    """Points [w', c_m, ..., c_1, w] and anchors [a_m, ..., a_1] (-1: the baseline).

    Monotonize moves a dimension by 1/m, as the authors' code (`steps` = m); `step` replaces
    that m (inseq's port reads its `n_steps` N as the point count: m = N - 2 anchors, step N)."""
    on_path, anchors, points = [word], [], [vocab[word]]
    current, step = word, step or m
    for _ in range(m):
        current = next_anchor(vocab, base, current, on_path, step, k, strategy)
        if current is None:
            points.append(base.clone())
            anchors.append(-1)
            continue
        on_path.append(current)
        anchors.append(current)
        points.append(monotonize(base, points[-1], vocab[current], step))
    points.append(base.clone())
    return points[::-1], anchors[::-1]

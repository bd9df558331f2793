"""Chunks of (copy, row) work grouped by row length, so that a chunk of short rows does not run
at the width of the batch's longest row.

A path method runs `copies` interpolated copies of every row (IG's points, GradientSHAP's
samples), `size` copies per forward. Where a chunk mixes rows of very different lengths, every
copy runs at the longest one's width; `_triangular.gradients` drops the columns that none of a
chunk's rows uses. So the rows are sorted by length and cut into buckets, and no chunk spans two
buckets. The cut is chosen by dynamic programming over a cost counted in positions x steps of
one copy (the backward's work): a bucket of rows B costs copies * |B| * T_B * (S_B + T_B) (its
longest source S_B and target T_B) plus `CHUNK_CALL` for each forward it needs, and a bucket
holds at least `MIN_COPIES` copies unless it holds every row (smaller backwards pay more per
copy on a CPU; `benchmarks/bench_triangular.py` measures the curve).
"""

import torch

from fnattr.batch import Batch

CHUNK_CALL = 214  # a forward call and a rounded-up backward call (`_triangular`'s fixed costs)
MIN_COPIES = 16


def _lengths(batch: Batch, rows: list[int]) -> tuple[list[int], list[int]]:
    idx = torch.as_tensor(rows, dtype=torch.long)
    src = batch.source_mask.cpu()[idx].sum(1).tolist()
    tgt = [int(m.nonzero().max()) + 1 if m.any() else 1 for m in batch.target_mask.cpu()[idx]]
    return src, tgt


def buckets(batch: Batch, rows: list[int], copies: int, size: int, *,
            min_copies: int | None = None) -> list[list[int]]:
    """`rows` sorted by length and cut where it costs least (see the module docstring), each
    bucket with at least `min_copies` (default `MIN_COPIES`) copies unless it holds every row."""
    min_copies = MIN_COPIES if min_copies is None else min_copies
    if len(rows) < 2:
        return [list(rows)]
    src, tgt = _lengths(batch, rows)
    order = sorted(range(len(rows)), key=lambda i: (src[i] + tgt[i], tgt[i], rows[i]))
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        s = t = 0
        for i in range(j - 1, -1, -1):  # bucket order[i:j]
            s, t = max(s, src[order[i]]), max(t, tgt[order[i]])
            m = j - i
            if m * copies < min_copies and m < n:
                continue
            cost = best[i] + copies * m * t * (s + t) + CHUNK_CALL * -(-copies * m // size)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append([rows[order[k]] for k in range(cut[j], j)])
        j = cut[j]
    return out[::-1]


def chunks(batch: Batch, rows: list[int], copies: int, size: int) -> list[list[tuple[int, int]]]:
    """The (copy, row) pairs of every copy of `rows`, at most `size` per chunk, no chunk mixing
    two length buckets; within a bucket copy by copy, as the rows come."""
    out = []
    for bucket in buckets(batch, list(rows), copies, size):
        pairs = [(c, r) for c in range(copies) for r in bucket]
        out += [pairs[lo:lo + size] for lo in range(0, len(pairs), size)]
    return out

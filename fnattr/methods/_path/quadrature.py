"""Quadrature rules on [0, 1] for path methods: points (alphas) and weights summing to 1."""

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Rule = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
RULES: tuple[str, ...] = Rule.__args__


@lru_cache(maxsize=32)
def _rule(method: str, n_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return tuple((x + 1) / 2), tuple(w / 2)
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("`n_steps` must be at least 2 for riemann_trapezoid.")
        alphas = np.linspace(0, 1, n_steps)
        weights = np.full(n_steps, 1 / (n_steps - 1))
        weights[[0, -1]] /= 2
        return tuple(alphas), tuple(weights)
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    alphas = (np.arange(n_steps) + offset) / n_steps
    return tuple(alphas), tuple(np.full(n_steps, 1 / n_steps))


def next_level(method: str, n_steps: int) -> tuple[int, float, Tensor, Tensor] | None:
    """The level after `n_steps` points of `method` that keeps every one of them, where the rule
    nests: (its points m, scale, the new points, their weights), so that the rule with m points is
    `scale` times the rule with `n_steps` points plus the new points. riemann_left and
    riemann_right double (m = 2n: the old points with half their weight, and the odd multiples of
    1/2n), riemann_trapezoid halves its intervals (m = 2n - 1: the old points with half their
    weight, and the old intervals' midpoints). None for gausslegendre and riemann_middle, whose
    points do not nest under doubling."""
    if method in ("riemann_left", "riemann_right"):
        m = 2 * n_steps
        new = (2 * np.arange(n_steps) + 1) / m
        return m, 0.5, torch.tensor(new), torch.full((n_steps,), 1 / m, dtype=torch.float64)
    if method == "riemann_trapezoid" and n_steps >= 2:
        m = 2 * n_steps - 1
        new = (2 * np.arange(n_steps - 1) + 1) / (m - 1)
        return m, 0.5, torch.tensor(new), torch.full((n_steps - 1,), 1 / (m - 1), dtype=torch.float64)
    return None


def quadrature(method: str, n_steps: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Points `alphas` in [0, 1] and `weights` (summing to 1) of rule `method` with `n_steps`."""
    if method not in RULES:
        raise ValueError(f"`method`={method!r} is not a quadrature rule: use one of {list(RULES)}.")
    if n_steps < 1:
        raise ValueError(f"`n_steps`={n_steps}: it must be at least 1.")
    alphas, weights = _rule(method, n_steps)
    return torch.tensor(alphas, dtype=dtype), torch.tensor(weights, dtype=dtype)

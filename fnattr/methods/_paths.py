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


def quadrature(method: str, n_steps: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Points `alphas` in [0, 1] and `weights` (summing to 1) of rule `method` with `n_steps`."""
    if method not in RULES:
        raise ValueError(f"`method`={method!r} is not a quadrature rule: use one of {list(RULES)}.")
    if n_steps < 1:
        raise ValueError(f"`n_steps`={n_steps}: it must be at least 1.")
    alphas, weights = _rule(method, n_steps)
    return torch.tensor(alphas, dtype=dtype), torch.tensor(weights, dtype=dtype)

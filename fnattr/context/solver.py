"""A small LASSO solver (cyclic coordinate descent) and ContextCite's surrogate on top of it.

`lasso` minimises (1 / 2n) ||y - b - X w||^2 + alpha ||w||_1 (scikit-learn's `Lasso`
objective, intercept unpenalised) for a batch of problems at once. `surrogate` is ContextCite's
`LassoRegression.fit` (context_cite 0.0.4, `solver.py`): features standardised, the output
divided by the number of tokens it sums, the weights scaled back. No scikit-learn needed.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fnattr._check import typechecked


@typechecked
def lasso(
    x: Float[Tensor, "*b n p"], y: Float[Tensor, "*b n"], alpha: float, *,
    max_iter: int = 10_000, tol: float = 1e-12,
) -> tuple[Float[Tensor, "*b p"], Float[Tensor, "*b"]]:
    """(weights, intercept) minimising (1 / 2n) ||y - b - x w||^2 + alpha ||w||_1, by cyclic
    coordinate descent until no weight moves by more than `tol` in a sweep (in float64).

    >>> w, b = lasso(torch.randn(100, 5, dtype=torch.float64), y, alpha=0.01)
    """
    if alpha < 0:
        raise ValueError(f"`alpha`={alpha}: the L1 penalty must be non-negative.")
    x, y = x.to(torch.float64), y.to(torch.float64)
    n = x.shape[-2]
    xm, ym = x.mean(-2), y.mean(-1)
    xc, yc = x - xm[..., None, :], y - ym[..., None]
    norm = xc.square().sum(-2) / n  # [*b p]
    w = torch.zeros_like(xm)
    r = yc.clone()
    for _ in range(max_iter):
        moved = torch.zeros((), dtype=torch.float64)
        for j in range(x.shape[-1]):
            old = w[..., j].clone()
            rho = (xc[..., j] * r).sum(-1) / n + norm[..., j] * old
            new = torch.where(norm[..., j] > 0, torch.sign(rho) * (rho.abs() - alpha).clamp(min=0)
                              / norm[..., j].clamp(min=1e-300), torch.zeros_like(rho))
            r = r - xc[..., j] * (new - old)[..., None]
            w[..., j] = new
            moved = torch.maximum(moved, (new - old).abs().max() if new.numel() else moved)
        if moved <= tol:
            break
    return w, ym - (xm * w).sum(-1)


@typechecked
def surrogate(
    masks: Bool[Tensor, "n p"], outputs: Float[Tensor, "*b n"], n_tokens: int | Tensor,
    alpha: float = 0.01,
) -> tuple[Float[Tensor, "*b p"], Float[Tensor, "*b"]]:
    """ContextCite's surrogate: LASSO (`alpha`) of `outputs / n_tokens` on the standardised
    `masks` (True keeps a source), weights and bias scaled back to the masks' 0/1 scale and
    to the output. `n_tokens` [*b] or an int: the tokens each output sums."""
    x = masks.to(torch.float64)
    mean, scale = x.mean(0), x.std(0, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # as StandardScaler
    n_tok = torch.as_tensor(n_tokens, dtype=torch.float64)
    y = outputs.to(torch.float64) / n_tok[..., None]
    xs = ((x - mean) / scale).expand(*y.shape[:-1], *x.shape)
    w, b = lasso(xs, y, alpha)
    return w / scale * n_tok[..., None], (b - (w * (mean / scale)).sum(-1)) * n_tok


def _ranks(v: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks from 1, ties sharing their mean rank."""
    less = (v[None, :] < v[:, None]).sum(1).to(torch.float64)
    same = (v[None, :] == v[:, None]).sum(1).to(torch.float64)
    return less + (same + 1) / 2


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    ra, rb = _ranks(a.to(torch.float64)), _ranks(b.to(torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / den) if den > 0 else float("nan")

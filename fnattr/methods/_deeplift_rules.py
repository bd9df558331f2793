"""DeepLIFT multipliers for a forward that stacks [input rows; reference rows] along dim 0.

Every rule keeps the value of its op and changes only its gradient, so that for the input half
sum(multiplier * (x - x_ref)) == y - y_ref holds exactly at that op; the chain rule then sums to
f(x) - f(ref) exactly. Ops are caught by a `TorchFunctionMode` (transformers calls softmax,
norms and attention as functions) and by hooks on activation modules:
- Rescale rule (Shrikumar et al. 2017): elementwise activation modules (torch.nn activations,
  transformers' ACT2FN classes: GELU, NewGELU, SiLU, ReLU, ...) as a whole, and the elementwise
  functions exp, log, tanh, sigmoid, erf, sqrt, rsqrt, reciprocal, pow (scalar exponent),
  relu, gelu, silu, softplus, elu, mish: multiplier (y - y_ref) / (x - x_ref), the gradient where
  |x - x_ref| <= EPS.
- Average product rule for products of two input-dependent tensors (mul, matmul, bmm, division):
  d(ab) = mean(a, a_ref) db + da mean(b, b_ref), exact for bilinear maps.
- softmax and log_softmax are decomposed as exp(s - logsumexp(s)), logsumexp = m + log(sum(exp(s - m)))
  with m = max(s) (each row's own: every secant is then at most 1, no huge multipliers that
  cancel) and the max's own exact rule (its change is a convex combination of the changes of
  the entries at the two argmaxes); layer_norm, rms_norm and scaled_dot_product_attention are
  decomposed into these rules and products, which makes them exact too.
Every other op gets its plain gradient: exact for linear ops (linear layers, sums, reshapes,
gathers); for any other nonlinear function it is what `delta` then reports.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

EPS = 1e-10
_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softsign,
)


def is_elementwise(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_ACTIVATIONS) or type(module).__module__ == "transformers.activations"


def _rel(dtype: torch.dtype) -> float:
    """Relative size of an input difference below which the secant is replaced by the gradient."""
    return torch.finfo(dtype).eps ** 0.5


def _active(t: object) -> bool:
    """A tensor that carries input gradients and pairs rows [:n] with references [n:]."""
    return (isinstance(t, Tensor) and t.requires_grad and t.is_floating_point() and t.ndim > 0
            and t.shape[0] % 2 == 0)


def _lin(x: Tensor) -> Tensor:
    """Zero-valued, gradient 1: carries x's gradient into a rule (0 where x is infinite)."""
    return torch.where(torch.isfinite(x), x - x.detach(), 0)


def _pair_mean(t: Tensor) -> Tensor:
    n = t.shape[0] // 2
    mean = ((t[:n] + t[n:]) / 2).detach()
    return torch.cat([mean, mean])


def rescale(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) (elementwise) with the Rescale rule's multipliers."""
    y = fn(x)
    if not _active(x) or y.shape != x.shape:
        return y
    (slope,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    n = x.shape[0] // 2
    with torch.no_grad():
        dx, dy = x[:n] - x[n:], y[:n] - y[n:]
        tol = EPS + _rel(x.dtype) * (x[:n].abs() + x[n:].abs())  # below it, dy is rounding noise
        ok = (dx.abs() > tol) & torch.isfinite(dx) & torch.isfinite(dy)
        m = torch.where(ok, dy / torch.where(ok, dx, 1), slope[:n])
        m = torch.cat([m, slope[n:]]).nan_to_num(0.0)
    return y.detach() + (m * _lin(x)).to(y.dtype)


def product(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """fn(a, b) for a bilinear fn (mul, matmul, ...) with the average product rule."""
    out = fn(a, b)
    if not (_active(a) and _active(b)) or a.shape[0] != b.shape[0]:
        return out
    return out.detach() + fn(_pair_mean(a), _lin(b)) + fn(_lin(a), _pair_mean(b))


def max_rule(s: Tensor, dim: int) -> Tensor:
    """s.amax(dim, keepdim=True) with exact, bounded multipliers: the input's max moves by
    dm = lam * ds[a] + (1 - lam) * ds[a_ref] with lam in [0, 1], a / a_ref the two argmaxes."""
    m = s.amax(dim, keepdim=True)
    value = torch.where(torch.isfinite(m), m, 0).detach()
    if not _active(s):
        return value
    n = s.shape[0] // 2
    with torch.no_grad():
        a_in, a_ref = s[:n].argmax(dim, keepdim=True), s[n:].argmax(dim, keepdim=True)
        ds = torch.where(torch.isfinite(s[:n]), s[:n] - s[n:], 0)
        d1, d2 = ds.gather(dim, a_in), ds.gather(dim, a_ref)
        dm = torch.where(torch.isfinite(m[:n]) & torch.isfinite(m[n:]), m[:n] - m[n:], 0)
        ok = (d1 - d2).abs() > EPS
        lam = torch.where(ok, (dm - d2) / torch.where(ok, d1 - d2, 1), 0.5).clamp(0, 1)
        c = torch.zeros_like(s)
        c[:n].scatter_add_(dim, a_in, lam)
        c[:n].scatter_add_(dim, a_ref, 1 - lam)
        c[n:].scatter_add_(dim, a_ref, torch.ones_like(lam))
        c = c * torch.isfinite(m)
    return value + (c * _lin(s)).sum(dim, keepdim=True)


def _logsumexp(s: Tensor, dim: int) -> Tensor:
    """m + log(sum(exp(s - m))) with m each row's own max: every secant stays bounded by 1."""
    m = max_rule(s, dim)
    z = rescale(torch.exp, s - m).sum(dim, keepdim=True)
    z = z + (z == 0).detach()  # a fully masked row: log 1 = 0 (its softmax is then 0, as SDPA's)
    return m + rescale(torch.log, z)


def softmax(s: Tensor, dim: int) -> Tensor:
    return rescale(torch.exp, s - _logsumexp(s, dim))


def log_softmax(s: Tensor, dim: int) -> Tensor:
    return s - _logsumexp(s, dim)


def _norm(x: Tensor, dims: tuple[int, ...], eps: float, center: bool) -> Tensor:
    c = x - x.mean(dims, keepdim=True) if center else x
    var = product(torch.mul, c, c).mean(dims, keepdim=True)
    return product(torch.mul, c, rescale(torch.rsqrt, var + eps))


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = product(torch.matmul, q, k.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return product(torch.matmul, softmax(s, -1), v)


def _arg(args, kwargs, i, name, default=None):
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else default)


def _softmax_call(fn):
    def call(func, args, kwargs):
        x, dim = args[0], _arg(args, kwargs, 1, "dim")
        if "dtype" in kwargs:
            dtype = kwargs["dtype"]
        elif func is F.softmax or func is F.log_softmax:  # (input, dim, _stacklevel, dtype)
            dtype = args[3] if len(args) > 3 else None
        else:  # (input, dim, dtype)
            dtype = args[2] if len(args) > 2 else None
        if dim is None:
            return func(*args, **kwargs)
        return fn(x if dtype is None else x.to(dtype), dim)
    return call


def _shape(shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _layer_norm(func, args, kwargs):
    x, shape = args[0], _shape(_arg(args, kwargs, 1, "normalized_shape"))
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    y = _norm(x, tuple(range(-len(shape), 0)), _arg(args, kwargs, 4, "eps", 1e-5), center=True)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _rms_norm(func, args, kwargs):
    x, shape = args[0], _shape(_arg(args, kwargs, 1, "normalized_shape"))
    weight, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "eps")
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = _norm(x, tuple(range(-len(shape), 0)), eps, center=False)
    return y if weight is None else y * weight


def _div(func, args, kwargs):
    a, b = args[0], args[1]
    if func is Tensor.__rtruediv__:
        a, b = b, a
    if not _active(b) or kwargs.get("rounding_mode") is not None:
        return func(*args, **kwargs)
    return product(torch.mul, a, rescale(torch.reciprocal, b)) if isinstance(a, Tensor) \
        else a * rescale(torch.reciprocal, b)


def _unary(func, args, kwargs):
    return rescale(lambda t: func(t, *args[1:], **kwargs), args[0])


def _binary(func, args, kwargs):
    if kwargs or len(args) != 2 or not all(isinstance(t, Tensor) for t in args):
        return func(*args, **kwargs)
    return product(func, args[0], args[1])


def _pow(func, args, kwargs):
    if isinstance(args[1], Tensor):
        return func(*args, **kwargs)
    return _unary(func, args, kwargs)


def _table() -> dict:
    table = {}
    unary = ["exp", "log", "tanh", "sigmoid", "erf", "sqrt", "rsqrt", "reciprocal", "relu"]
    for name in unary:
        table[getattr(torch, name)] = table[getattr(Tensor, name)] = _unary
    for f in (F.relu, F.gelu, F.silu, F.softplus, F.elu, F.mish, F.tanh, F.sigmoid):
        table[f] = _unary
    for f in (torch.pow, Tensor.pow, Tensor.__pow__):
        table[f] = _pow
    for f in (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.matmul, Tensor.matmul,
              Tensor.__matmul__, torch.bmm, Tensor.bmm):
        table[f] = _binary
    for f in (torch.div, Tensor.div, Tensor.__truediv__, Tensor.__rtruediv__):
        table[f] = _div
    for f in (F.softmax, torch.softmax, Tensor.softmax):
        table[f] = _softmax_call(softmax)
    for f in (F.log_softmax, torch.log_softmax, Tensor.log_softmax):
        table[f] = _softmax_call(log_softmax)
    table[F.layer_norm] = _layer_norm
    table[F.rms_norm] = _rms_norm
    table[F.scaled_dot_product_attention] = lambda func, args, kwargs: _sdpa(*args, **kwargs)
    return table


_RULES = _table()


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is None or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if not any(_active(t) for t in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        return rule(func, args, kwargs)


def _module_rescale(module: nn.Module, args: tuple, output: object) -> object:
    if not args or not isinstance(output, Tensor) or not _active(args[0]):
        return None
    x = args[0]
    if x.shape != output.shape:
        return None
    return rescale(lambda t: output if t is x else module(t), x)


@contextmanager
def deeplift_rules(model: nn.Module) -> Iterator[None]:
    """Apply the rules above to `model`'s forward (and to any torch code run inside); restored
    on exit."""
    elementwise = [m for m in model.modules() if is_elementwise(m)]
    hooks = []
    try:
        for m in elementwise:
            hooks.append(m.register_forward_hook(_module_rescale))
        with _Mode():
            yield
    finally:
        for h in reversed(hooks):
            h.remove()

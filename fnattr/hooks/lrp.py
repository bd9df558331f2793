"""`lrp_rules`: this model's backward under AttnLRP's or CP-LRP's rules, restored on exit.

Both methods are Gradient x Input under modified backward rules (the "efficient" formulation of
the authors' implementation, lxt 2.1, `lxt/efficient/rules.py` and `patches.py`): the gradient of
each step's target, times the input embeddings, is the relevance. Inside the block, forward hooks
on *this model's own modules* (never transformers' classes or global registries) replace outputs
with tensors of the same values whose backward follows the rules:

- elementwise non-linearities (SiLU, GELU, ReLU, ... modules): identity rule (AttnLRP Eq. 9): the
  backward multiplies the output gradient by `out / (in + 1e-10)` (lxt's epsilon, not sign-aware);
- LayerNorm / RMSNorm: the normaliser (std or rms) is a constant in the backward (AttnLRP's
  identity rule on normalisation, lxt's `rms_norm_forward` / `layer_norm_forward`), mean centring
  stays in the backward;
- the gated MLP product `act(gate) * up` (AttnLRP): uniform rule (Eq. 7), half the gradient at the
  product; CP-LRP (lxt's `cp_gated_mlp_forward`): no gradient through the gate, the full one
  through `up`;
- attention: AttnLRP's uniform rule on `q.k` and `attention.v` is applied, as lxt 2.1 does it, by
  dividing the gradient at the query and key projections by 4 and at the value projection by 2
  (each product halves it; q and k lie behind both products). The softmax keeps its own gradient:
  Gradient x Input on softmax is AttnLRP's softmax rule (Proposition 3.1, a Taylor decomposition at
  the input *with* the bias term, `R_in = x (R_out - s sum R_out)`), whose bias term absorbs part of
  the relevance. CP-LRP (Ali et al. 2022) detaches the query and key projections: no relevance
  passes through the attention weights, which become constants;
- linear layers, embeddings, residual sums: their plain gradient (Gradient x Input is the epsilon
  rule with epsilon 0 there; biases and position embeddings absorb relevance).

Where the issue's summary and lxt differ, this follows lxt: the division at q, k and v instead of
rules at the two products and the softmax, and no epsilon beyond lxt's own 1e-10. Every module of
the model must have a rule or be known to need none; otherwise `lrp_rules` refuses with one line
naming the module class, before touching the model (never silently plain gradients).

The rules' autograd Functions define `setup_context` and `generate_vmap_rule = True`, so
`torch.autograd.grad(..., is_grads_batched=True)` (the engine's one batched backward) runs them.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from fnattr.hooks.frozen import model_lock, undo_all
from fnattr.types import Model

Rule = Literal["attnlrp", "cp_lrp"]
RULES: tuple[str, ...] = Rule.__args__
EPSILON = 1e-10  # lxt 2.1 `identity_rule_implicit_fn`: out / (in + 1e-10)


class _Gradient(torch.autograd.Function):
    """`value` forward (a tensor equal to what the module computed); backward `grad * scale` to
    `x`. The identity rule (scale = out / in), the uniform rule (scale 1/2, 1/4)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, value: Tensor, scale: Tensor | float) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        scale = inputs[2]
        ctx.is_tensor = isinstance(scale, Tensor)
        if ctx.is_tensor:
            ctx.save_for_backward(scale)
        else:
            ctx.scale = scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        # saved tensors read once: `torch.utils.checkpoint` (`checkpointed`) unpacks them once
        scale = ctx.saved_tensors[0] if ctx.is_tensor else ctx.scale
        return grad * scale, None, None


class _Surrogate(torch.autograd.Function):
    """`value` forward; backward: the gradient of `surrogate` (same shape), which is `value`
    recomputed with the normaliser held constant (values equal up to rounding)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, surrogate: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def identity_rule(x: Tensor, out: Tensor) -> Tensor:
    """`out` (= fn(x), elementwise) whose backward is the identity rule: grad * out / (x + eps)."""
    out = out.detach()
    return _Gradient.apply(x, out, out / (x.detach() + EPSILON))


def divide_gradient(x: Tensor, scale: Tensor | float) -> Tensor:
    """`x` whose backward multiplies the gradient by `scale` (1/2: uniform rule on a product)."""
    return _Gradient.apply(x, x.detach(), scale)


# ---- normalisers held constant: each module's own arithmetic, normaliser detached -------------

def _rms_llama(m: nn.Module, x: Tensor) -> Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon).detach()
    return m.weight * h.to(x.dtype)


def _rms_gemma(m: nn.Module, x: Tensor) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps).detach()
    return (h * (1.0 + m.weight.float())).type_as(x)


def _rms_t5(m: nn.Module, x: Tensor) -> Tensor:
    h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + m.variance_epsilon).detach()
    if m.weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(m.weight.dtype)
    return m.weight * h


def _layer_norm(m: nn.LayerNorm, x: Tensor) -> Tensor:
    dims = tuple(range(-len(m.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    std = ((x - mean).pow(2).mean(dims, keepdim=True) + m.eps).sqrt()
    y = (x - mean) / std.detach()
    if m.weight is not None:
        y = y * m.weight
    if m.bias is not None:
        y = y + m.bias
    return y


_NORMS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    **dict.fromkeys(("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"), _rms_llama),
    "GemmaRMSNorm": _rms_gemma, "Gemma3RMSNorm": _rms_gemma,
    "T5LayerNorm": _rms_t5, "MT5LayerNorm": _rms_t5,
}

# attention modules: the projections whose outputs are q, k, v (a fused projection: its q, k, v
# thirds along the last dim)
_ATTENTION: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                     "GemmaAttention", "Gemma3Attention", "OPTAttention", "BartAttention",
                     "MBartAttention", "PegasusAttention", "M2M100Attention", "MarianAttention",
                     "GPTJAttention"),
                    ("q_proj", "k_proj", "v_proj")),
    "T5Attention": ("q", "k", "v"), "MT5Attention": ("q", "k", "v"),
    "GPT2Attention": ("c_attn",),
}
# gated MLPs: (gate projection, module whose input is act(gate) * up)
_GATED: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma3MLP"),
                    ("gate_proj", "down_proj")),
    "T5DenseGatedActDense": ("wi_0", "wo"), "MT5DenseGatedActDense": ("wi_0", "wo"),
}
# modules whose own arithmetic is linear in their input (or independent of it: rotary and
# position embeddings, whose outputs absorb relevance like biases); their children have rules
_PASS = {
    f"{family}{part}" for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma3")
    for part in ("ForCausalLM", "Model", "DecoderLayer", "RotaryEmbedding", "TextScaledWordEmbedding")
} | {
    f"{family}{part}" for family in ("Bart", "MBart", "Pegasus", "M2M100", "Marian")
    for part in ("ForConditionalGeneration", "MTModel", "Model", "Encoder", "Decoder", "EncoderLayer",
                 "DecoderLayer", "LearnedPositionalEmbedding", "SinusoidalPositionalEmbedding",
                 "ScaledWordEmbedding")
} | {
    f"{family}{part}" for family in ("T5", "MT5")
    for part in ("ForConditionalGeneration", "Stack", "Block", "LayerSelfAttention",
                 "LayerCrossAttention", "LayerFF", "DenseActDense")
} | {
    "Gemma3TextModel", "GPT2LMHeadModel", "GPT2Model", "GPT2Block", "GPT2MLP",
    "GPTJForCausalLM", "GPTJModel", "GPTJBlock", "GPTJMLP",
    "OPTForCausalLM", "OPTModel", "OPTDecoder", "OPTDecoderLayer", "OPTLearnedPositionalEmbedding",
}
COVERED = ("Llama (SmolLM2), Mistral, Qwen2, Qwen3, Gemma, Gemma3, GPT2, GPT-J, OPT, Bart, MBart, Pegasus, "
           "M2M100, Marian, T5 and MT5")
_PLAIN = (nn.Linear, nn.Embedding, nn.Dropout, nn.ModuleList, nn.Identity)
_NOT_ELEMENTWISE = {"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "GLU"}
# config options that add a non-linearity outside any module (tanh soft-capping)
_CONFIG_REFUSED = ("attn_logit_softcapping", "final_logit_softcapping")


def _is_activation(m: nn.Module) -> bool:
    return (type(m).__module__ in ("transformers.activations", "torch.nn.modules.activation")
            and type(m).__name__ not in _NOT_ELEMENTWISE)


def _is_plain(m: nn.Module) -> bool:
    return isinstance(m, _PLAIN) or type(m).__name__ == "Conv1D"


def _refuse(model: nn.Module, name: str, what: str, rule: str) -> None:
    raise ValueError(f"lrp_rules({rule!r}) has no rule for {what} (module {name or 'the model'!r} of "
                     f"{type(model).__name__}): LRP covers {COVERED}; use input_x_gradient or another "
                     "method for this model.")


def _check_config(model: nn.Module, rule: str) -> None:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        for key in _CONFIG_REFUSED:
            if getattr(cfg, key, None) is not None:
                _refuse(model, "", f"{type(model).__name__} with {key}={getattr(cfg, key)} "
                        "(tanh soft-capping)", rule)


def plan(model: nn.Module, rule: str) -> list[tuple[nn.Module, str, Callable]]:
    """(module, "forward" or "pre", hook) for every rule placed on `model`; raises ValueError
    with one line naming the first module class without a rule. Touches nothing."""
    if rule not in RULES:
        raise ValueError(f"`rule`={rule!r}: use one of {list(RULES)}.")
    _check_config(model, rule)
    out: list[tuple[nn.Module, str, Callable]] = []
    seen: set[int] = set()
    claimed: set[int] = set()  # projections and gates handled by their attention or MLP module
    for name, m in model.named_modules():
        cls = type(m).__name__
        if id(m) in seen:
            continue
        seen.add(id(m))
        if cls in _ATTENTION:
            for child in _ATTENTION[cls]:
                proj = getattr(m, child, None)
                if proj is not None:
                    hook = _projection_hook(m, child, rule)
                    if hook is not None:
                        out.append((proj, "forward", hook))
                    claimed.add(id(proj))
            if getattr(m, "q_attn", None) is not None:  # GPT2 cross-attention: q alone, k and v fused
                out.append((m.q_attn, "forward", _scale_hook(0.25 if rule == "attnlrp" else 0.0)))
                claimed.add(id(m.q_attn))
        elif cls in _GATED:
            gate, consumer = (getattr(m, n) for n in _GATED[cls])
            if rule == "attnlrp":
                out.append((consumer, "pre", _half_input))
            else:
                out.append((gate, "forward", _detach_output))
                claimed.add(id(gate))
        elif cls in _NORMS or isinstance(m, nn.LayerNorm):
            out.append((m, "forward", _norm_hook(_NORMS.get(cls, _layer_norm))))
        elif _is_activation(m):
            out.append((m, "forward", _identity_hook))
        elif cls in _PASS or _is_plain(m) or id(m) in claimed:
            pass
        else:
            _refuse(model, name, cls, rule)
    return out


def _identity_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not isinstance(output, Tensor) or not x.requires_grad:
        return None
    return identity_rule(x, output)


def _norm_hook(linear: Callable[[nn.Module, Tensor], Tensor]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or not x.requires_grad:
            return None
        return _Surrogate.apply(output.detach(), linear(module, x))
    return hook


def _half_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.requires_grad:
        return None
    return (divide_gradient(x, 0.5), *args[1:])


def _detach_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output.detach()


def _scale_hook(scale: float | Tensor):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not output.requires_grad:
            return None
        if isinstance(scale, float) and scale == 0.0:
            return output.detach()
        s = scale.to(output.device, output.dtype) if isinstance(scale, Tensor) else scale
        return divide_gradient(output, s)
    return hook


def _projection_hook(attention: nn.Module, child: str, rule: str):
    """AttnLRP: q and k gradients / 4, v / 2 (lxt 2.1 `wrap_attention_forward`); CP-LRP: q and
    k detached (`cp_wrap_attention_forward`). GPT2's fused `c_attn`: per third of its output
    (`split_size`), or its k and v thirds in cross-attention (where `q_attn` gives q)."""
    attn = rule == "attnlrp"
    if child != "c_attn":
        scale = {"q": 0.25, "k": 0.25, "v": 0.5}[child[0]] if attn else (1.0 if child[0] == "v" else 0.0)
        return _scale_hook(scale) if scale != 1.0 else None
    third = attention.split_size
    parts = ("k", "v") if getattr(attention, "is_cross_attention", False) else ("q", "k", "v")
    per = {"q": 0.25, "k": 0.25, "v": 0.5} if attn else {"q": 0.0, "k": 0.0, "v": 1.0}
    scale = torch.cat([torch.full((third,), per[p], dtype=torch.float64) for p in parts])
    return _scale_hook(scale)


@contextmanager
def lrp_rules(model: Model, rule: Rule = "attnlrp") -> Iterator[Model]:
    """Inside the block, `model`'s backward follows AttnLRP's (Achtibat et al., ICML 2024,
    arXiv:2402.05602) or CP-LRP's (Ali et al., ICML 2022, arXiv:2202.07304) rules (see the module
    docstring); the forward's values are unchanged. Forward hooks on this model's modules only;
    all removed on exit, also after an error or a KeyboardInterrupt. Holds `model_lock(model)`.
    Raises ValueError, model untouched, where a module has no rule.

    >>> with lrp_rules(model, "attnlrp"):
    ...     relevance = torch.autograd.grad(logit, embeds)[0] * embeds
    """
    placements = plan(model, rule)  # validate before touching the model
    with model_lock(model):
        if is_lrp(model):
            raise RuntimeError("`lrp_rules` is already on this model: leave it first (rules applied "
                               "twice would divide the gradients twice).")
        handles: list = []
        try:
            for module, kind, hook in placements:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    handles.append(module.register_forward_hook(hook))
            yield model
        finally:
            undo_all([(h.remove, ()) for h in reversed(handles)])


def is_lrp(model: Model) -> bool:
    """Whether `model` runs inside `lrp_rules` (some rule hook is on one of its modules)."""
    return any(getattr(h, "__module__", None) == __name__ for m in model.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))

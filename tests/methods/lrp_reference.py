"""A plain reference for AttnLRP / CP-LRP, independent of `fnattr.hooks.lrp`: the forwards of
lxt 2.1's efficient patches (`lxt/efficient/patches.py`), rewritten here with detach tricks
instead of autograd Functions and placed differently (module forwards replaced per instance,
the attention rules at transformers' attention interface, as lxt places them). Used with the
per-step autograd reference `tests.reference.step_gradient`.

Detach tricks (values exact, gradients modified):
- `_scaled(x, c)`: value x, gradient c (uniform rule: c = 1/2 at a product; lxt divides q and k
  by 4, v by 2 at the attention function's inputs); c = 0 is lxt's `stop_gradient`;
- `_identity(fn, x)`: value fn(x), gradient fn(x) / (x + 1e-10) (lxt's `identity_rule_implicit`).
"""

import sys
import types
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

EPS = 1e-10


def _scaled(x, c: float):
    return x.detach() + (x - x.detach()) * c


def _identity(fn, x):
    y = fn(x)
    return y.detach() + (x - x.detach()) * (y / (x + EPS)).detach()


def _rms(self, h):  # lxt `rms_norm_forward`
    dtype = h.dtype
    h = h.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).detach()
    return self.weight * h.to(dtype)


def _gemma_rms(self, x):  # lxt `gemma3_norm` in Gemma3RMSNorm.forward
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps).detach()
    return (out * (1.0 + self.weight.float())).type_as(x)


def _layer_norm(self, x):  # lxt `layer_norm_forward`
    mean = x.mean(dim=-1, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
    return (x - mean) / std.detach() * self.weight + self.bias


def _t5_norm(self, h):
    var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon).detach())


def _activation(self, x):
    return _identity(type(self).forward.__get__(self), x)


def _gated_attnlrp(self, x):  # lxt `gated_mlp_forward`
    return self.down_proj(_scaled(self.act_fn(self.gate_proj(x)) * self.up_proj(x), 0.5))


def _t5_gated(rule: str):  # T5DenseGatedActDense.forward under lxt's gated MLP rules
    def forward(self, x):
        gate = self.wi_0(x)
        h = self.act(gate if rule == "attnlrp" else gate.detach()) * self.wi_1(x)
        return self.wo(_scaled(h, 0.5) if rule == "attnlrp" else h)
    return forward


def _gated_cp(self, x):  # lxt `cp_gated_mlp_forward`
    return self.down_proj(self.act_fn(self.gate_proj(x).detach()) * self.up_proj(x))


def _attention(rule: str):
    def attend(module, query, key, value, *args, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        if rule == "attnlrp":  # lxt `wrap_attention_forward`
            query, key, value = _scaled(query, 0.25), _scaled(key, 0.25), _scaled(value, 0.5)
        else:  # lxt `cp_wrap_attention_forward`
            query, key = query.detach(), key.detach()
        return eager(module, query, key, value, *args, **kwargs)
    return attend


for _rule in ("attnlrp", "cp_lrp"):
    AttentionInterface.register(f"lrp_reference_{_rule}", _attention(_rule))
    AttentionMaskInterface.register(f"lrp_reference_{_rule}", eager_mask)  # else: no causal mask


def _own_attention(rule: str):
    """GPT-J's `_attn(query, key, value, mask)` (outside the attention interface), wrapped alike."""
    def attn(self, query, key, value, *args, **kwargs):
        if rule == "attnlrp":
            query, key, value = _scaled(query, 0.25), _scaled(key, 0.25), _scaled(value, 0.5)
        else:
            query, key = query.detach(), key.detach()
        return type(self)._attn(self, query, key, value, *args, **kwargs)
    return attn


def _forward_for(module: nn.Module, rule: str):
    name = type(module).__name__
    if name in ("GemmaRMSNorm", "Gemma3RMSNorm"):
        return _gemma_rms
    if name in ("T5LayerNorm", "MT5LayerNorm"):
        return _t5_norm
    if hasattr(module, "wi_0") and hasattr(module, "wo"):
        return _t5_gated(rule)
    if name.endswith("RMSNorm"):
        return _rms
    if isinstance(module, nn.LayerNorm):
        return _layer_norm
    if hasattr(module, "gate_proj") and hasattr(module, "down_proj"):
        return _gated_attnlrp if rule == "attnlrp" else _gated_cp
    if type(module).__module__ in ("transformers.activations", "torch.nn.modules.activation"):
        return _activation
    return None


@contextmanager
def reference_rules(model: nn.Module, rule: str):
    """`model` with lxt's patched forwards on its own instances and the reference attention."""
    patched = []
    old = model.config._attn_implementation
    try:
        for m in model.modules():
            if type(m).__name__ == "GPTJAttention":
                m._attn = types.MethodType(_own_attention(rule), m)
                patched.append((m, "_attn"))
            fwd = _forward_for(m, rule)
            if fwd is not None:
                m.forward = types.MethodType(fwd, m)
                patched.append((m, "forward"))
        interface = not any(type(m).__name__ == "GPTJAttention" for m in model.modules())
        if interface:
            model.set_attn_implementation(f"lrp_reference_{rule}")
        yield model
    finally:
        if model.config._attn_implementation != old:
            model.set_attn_implementation(old)
        for m, attr in patched:
            delattr(m, attr)

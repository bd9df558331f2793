"""Baselines: what "absent" means for a token, chosen to be neutral for the model in hand.

`resolve_baseline` turns a method's `baseline` argument into a concrete choice, from what
`prepare()` recorded about the tokenizer's special tokens (`Batch.special_tokens`); `baselines`
builds the baseline embeddings of a method's context from that choice.

Why the zero vector comes before any special token: docs/methods.md, "Baselines".
"""

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from fnattr.batch import Batch

if TYPE_CHECKING:  # the type only: fnattr.attribution imports this module
    from fnattr.attribution import Context

# "auto" | "unk" | "pad" | "zeros" | a tensor; checked by `resolve_baseline`.
Baseline = str | Float[Tensor, "batch src d"]

KINDS = ("auto", "unk", "pad", "zeros")
# Roles that make a token a separator or a control token, whatever else it is.
_SEPARATOR_ROLES = {
    "bos": "the BOS token", "eos": "the EOS token", "sep": "the SEP token", "cls": "the CLS token",
    "mask": "the MASK token", "decoder_start": "the decoder start token",
    "extra": "an extra special token", "chat": "a chat-template token",
    "added": "an added special token",
}
# <|endoftext|>, <|im_end|>, <|eot_id|>, DeepSeek's fullwidth <｜end▁of▁sentence｜>.
_CONTROL = re.compile(r"<[|\uff5c].*[|\uff5c]>")


def _text(batch: Batch, token_id: int) -> str:
    return next((text for _, i, text in batch.special_tokens if i == token_id), "")


def _token_id(batch: Batch, role: str) -> int | None:
    """The unk or pad id that `prepare()` used, if the tokenizer or model config names one."""
    token_id = batch.unk_id if role == "unk" else batch.pad_id
    return token_id if (role, token_id) in {(r, i) for r, i, _ in batch.special_tokens} else None


def not_neutral(batch: Batch, token_id: int) -> str | None:
    """Why `token_id` is no neutral baseline (a separator or control token), or None."""
    mine = {r for r, i, _ in batch.special_tokens if i == token_id}
    roles = [text for r, text in _SEPARATOR_ROLES.items() if r in mine]
    if roles:
        return "is " + " and ".join(roles)
    if _CONTROL.fullmatch(_text(batch, token_id)):
        return "is a <|...|> control token"
    return None


def _named(role: str, token_id: int, text: str) -> str:
    return f"{role} token {text!r} (id {token_id})" if text else f"{role} id {token_id}"


# Methods for which the zero vector is a singular baseline. A model without position embeddings
# or biases before its first norm (Llama, SmolLM2) carries an all-zero residual stream from a
# zero input, and every RMSNorm there scales by 1/sqrt(eps): DeepLIFT's multipliers (secants to
# that reference) and DIG's gradients at its path's start overflow in float32 (NaN on SmolLM2).
# For them "auto" takes the UNK token (else the pad token) where it would take the zero vector.
ZERO_SINGULAR = {
    "deeplift": "its multipliers overflow at a zero reference (RMSNorm of an all-zero stream)",
    "layer_deeplift": "its multipliers overflow at a zero reference (RMSNorm of an all-zero stream)",
    "discretized_integrated_gradients": "its path starts at the baseline, where the gradient of "
                                        "RMSNorm at an all-zero stream overflows",
}


def _not_zeros(batch: Batch, method: str, reasons: list[str]) -> tuple[str, int | None, str] | None:
    """The UNK (else pad) token for a method in `ZERO_SINGULAR`, separator or not, or None."""
    for role in ("unk", "pad"):
        token_id = _token_id(batch, role)
        if token_id is not None:
            why = not_neutral(batch, token_id)
            text = _named(role, token_id, _text(batch, token_id)) + (f", which {why}" if why else "")
            return role, token_id, (f"{text}: not the zero vector, which is singular for {method} "
                                    f"({ZERO_SINGULAR[method]}; {'; '.join(reasons)})")
    return None


def _auto(batch: Batch, method: str | None = None) -> tuple[str, int | None, str]:
    if not batch.special_tokens:  # a Batch built without prepare(): the old default
        return _explicit(batch, "unk")
    reasons = []
    for role in ("unk", "pad"):
        token_id = _token_id(batch, role)
        if token_id is None:
            reasons.append(f"no {role} token")
            continue
        why = not_neutral(batch, token_id)
        if why is None:
            since = f", since {'; '.join(reasons)}" if reasons else ""
            return role, token_id, _named(role, token_id, _text(batch, token_id)) + since
        reasons.append(f"{role} {_text(batch, token_id)!r} (id {token_id}) {why}")
    if method in ZERO_SINGULAR:
        return _not_zeros(batch, method, reasons) or ("zeros", None, f"zero vector ({'; '.join(reasons)})")
    return "zeros", None, f"zero vector ({'; '.join(reasons)})"


def _explicit(batch: Batch, kind: str) -> tuple[str, int | None, str]:
    if kind == "zeros":
        return "zeros", None, "zero vector"
    if kind == "unk" and batch.unk_id is None:
        kind, note = "pad", " (the tokenizer has no unk token)"
    else:
        note = ""
    token_id = batch.unk_id if kind == "unk" else batch.pad_id
    why = not_neutral(batch, token_id)
    note = f", which {why}" + note if why else note
    return kind, token_id, _named(kind, token_id, _text(batch, token_id)) + note


def resolve_baseline(batch: Batch, baseline: Baseline, method: str | None = None
                     ) -> tuple[str, int | None, str]:
    """(kind, token id or None, description) of the baseline that `baseline` means for `batch`.

    `baseline="auto"` (the default) uses the UNK token only where it is an ordinary placeholder:
    no BOS, EOS, SEP, CLS, MASK, decoder-start, extra special, added special or chat-template
    token shares its id, and it is not spelled like a `<|...|>` control token (SmolLM2's and
    GPT-2's UNK `<|endoftext|>` separates documents). Otherwise it uses the pad token under the
    same test, and otherwise the zero vector, which on SmolLM2 tracks deleting a token more closely
    than any of its special tokens does. "unk", "pad" and "zeros" are taken as given ("unk"
    without an UNK token means "pad"), and a tensor is "tensor". Special tokens of the input
    always keep their embedding. For a `method` in `ZERO_SINGULAR` (DeepLIFT, layer DeepLIFT,
    DIG), "auto" takes the UNK (else the pad) token where it would take the zero vector.

    >>> resolve_baseline(batch, "auto")   # on SmolLM2
    ('zeros', None, "zero vector (unk '<|endoftext|>' (id 0) is a <|...|> control token; ...)")
    """
    if isinstance(baseline, Tensor):
        return "tensor", None, f"caller's tensor {list(baseline.shape)}"
    if baseline not in KINDS:
        raise ValueError(f"`baseline`={baseline!r}: use 'auto', 'unk', 'pad', 'zeros' or a tensor.")
    return _auto(batch, method) if baseline == "auto" else _explicit(batch, baseline)


def baseline_meta(
    batch: Batch, baseline: Baseline | Sequence[Baseline], *, attribute_target: bool,
    method: str | None = None,
) -> dict[str, str]:
    """`meta["baseline"]` (what was used, in words) and `meta["baseline_kind"]` for a method's
    `baseline` argument; a sequence of baselines (gradient_shap) joins its entries with " | "."""
    specs = list(baseline) if isinstance(baseline, (list, tuple)) else [baseline]
    kinds, texts = [], []
    for spec in specs:
        kind, _, text = resolve_baseline(batch, spec, method)
        if kind == "tensor" and attribute_target:
            text += f" (source side); target side: {resolve_baseline(batch, 'auto', method)[2]}"
        kinds.append(kind)
        texts.append(text)
    return {"baseline": " | ".join(texts), "baseline_kind": ",".join(kinds)}


def _fill(ctx: "Context", side: str, emb: Tensor, token_id: int | None) -> Tensor:
    """Baseline embeddings for one side: the token's embedding (zeros for None) at ordinary
    tokens, special tokens kept as they are."""
    ids, special = getattr(ctx.batch, f"{side}_ids"), getattr(ctx.batch, f"{side}_special")
    if token_id is None:
        fill = torch.zeros_like(emb)
    else:
        with torch.no_grad():
            fill = ctx.handle.embed(torch.full_like(ids, token_id), side)
    return torch.where(special[..., None], emb, fill)


def _warn_if_separator(batch: Batch, baseline: Baseline) -> None:
    if isinstance(baseline, Tensor) or baseline not in ("unk", "pad"):
        return
    _, token_id, text = resolve_baseline(batch, baseline)
    if not_neutral(batch, token_id) is not None:
        warnings.warn(f"`baseline`={baseline!r} is the {text}: the model may read it as a "
                      f"document or turn boundary. baseline='auto' uses the "
                      f"{resolve_baseline(batch, 'auto')[2]}.", UserWarning, stacklevel=3)


def baselines(ctx: "Context", baseline: Baseline,
              method: str | None = None) -> tuple[Tensor, Tensor]:
    """Source and target baselines. A tensor sets the source side; the target side uses "auto"
    (for `method`, see `resolve_baseline`)."""
    emb = ctx.embedded
    kind, token_id, _ = resolve_baseline(ctx.batch, baseline, method)
    if kind == "tensor":
        if baseline.shape != emb.source.shape:
            raise ValueError(f"`baseline` has shape {tuple(baseline.shape)}; the source embeddings "
                             f"have {tuple(emb.source.shape)}: pass one of that shape.")
        src = baseline.to(emb.source)
        _, token_id, _ = resolve_baseline(ctx.batch, "auto", method)
    else:
        _warn_if_separator(ctx.batch, baseline)
        src = _fill(ctx, "source", emb.source, token_id)
    tgt = _fill(ctx, "target", emb.target, token_id) if ctx.attribute_target else emb.target
    return src, tgt

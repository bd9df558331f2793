"""PECoRe (Sarti et al., ICLR 2024, arXiv:2310.01188): which generated tokens depend on the context
(context-sensitive target identification, CTI), and which context tokens made them so
(contextual cues imputation, CCI).

CTI compares, at every generated step, the next-token distribution with the context and without
it (the same generated prefix forced on both): the KL divergence (default) or P-CXMI
(`fnattr.targets.kl_divergence`, `pcxmi`). A step is context-sensitive when its score exceeds
mean + `cti_std` * std over the response's steps (std with Bessel's correction, as torch's
default; `cti_std=1` as inseq's `attribute-context`). CCI attributes each selected step with any
fnattr method and a contrastive target: by default `contrast_prob_diff`, p(y_t | C, x, y<t) -
p(y'_t | C, x, y<t) where y'_t is the token the model predicts there without the context (the
contrastive term rerun at every perturbed input, so both carry the gradient). Where the
contextless prediction is y_t itself, the contrast is the contextless input with y_t:
p(y_t | C, x, y<t) - p(y_t | x, y<t). Context tokens are the source group(s) of the context;
`cci_top_k` of them (or of its `groups`) are reported per selected token.
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from fnattr import targets as _targets
from fnattr.batch import prepare
from fnattr.contrast import Contrast, _run_other, prepare_contrast
from fnattr.engine import score_steps
from fnattr.groups import splitter
from fnattr.attribution import attribution_context, clean_logits, fn_name
from fnattr.result import AttributionTensors
from fnattr.types import Model

TEMPLATE = "{context}\n{input}"  # the contextual prompt; without context: "{input}"


def _prompt(context: str, input: str, template: str) -> tuple[str, tuple[int, int]]:
    """The contextual prompt and where the context lies in it."""
    if "{context}" not in template or "{input}" not in template:
        raise ValueError(f"`template`={template!r} must contain {{context}} and {{input}}.")
    head = template.split("{context}")[0].format(input=input)
    return template.format(context=context, input=input), (len(head), len(head) + len(context))


def _spans(context: str, at: tuple[int, int], groups: Any) -> list[tuple[int, int]]:
    """The groups' spans in the prompt: the context as one group, or split by `groups`."""
    if groups is None:
        return [at]
    return [(at[0] + a, at[0] + b) for a, b in splitter(groups)(context)]


def cti(contrast: Contrast, batch, logits: Tensor, metric: str) -> Tensor:
    """CTI scores [tgt] of row 0: KL(p(.|C, x) || p(.|x)) in nats, or P-CXMI in bits."""
    fn = _targets.kl_divergence(contrast) if metric == "kl" else _targets.pcxmi(contrast)
    steps = torch.arange(batch.target_ids.shape[1], device=logits.device)
    return score_steps(fn, logits, batch, steps)[0].detach().cpu()


def select(scores: Tensor, real: Tensor, k: float) -> tuple[list[int], float]:
    """Steps whose score exceeds mean + k * std over the real steps, and that threshold."""
    vals = scores[real]
    if len(vals) < 2:
        return [], float("inf")
    threshold = float(vals.mean() + k * vals.std())
    return [int(t) for t in real.nonzero().squeeze(1).tolist() if scores[t] > threshold], threshold


def _cci_contrast(model, tokenizer, batch, contextless: str, c_logits: Tensor, t: int):
    """The CCI contrast of step t: the contextless prediction y'_t at t with the context, or,
    where y'_t = y_t, the contextless input with y_t."""
    y_alt = int(c_logits[0, t].argmax())
    if y_alt != int(batch.target_ids[0, t]):
        ids = batch.target_ids.clone()
        ids[0, t] = y_alt
        cb = dataclasses.replace(batch, target_ids=ids)
        n = int(batch.target_mask[0].sum())
        index = torch.arange(batch.target_ids.shape[1])[None]
        return _run_other(model, cb, batch, index, [n], "source", swapped=False), y_alt, "target"
    return prepare_contrast(model, tokenizer, batch, contrast_sources=[contextless]), y_alt, "source"


def pecore(
    model: Model, tokenizer, *, context: str, input: str, output: str | None = None,
    template: str = TEMPLATE, cti_metric: Literal["kl", "pcxmi"] = "kl", cti_std: float = 1.0,
    method: str | Callable = "saliency", cci_target: Callable = _targets.contrast_prob_diff,
    cci_top_k: int = 3, groups: Any = None, max_new_tokens: int = 32, chat: bool = False,
    **method_args: Any,
) -> AttributionTensors:
    """PECoRe: context-sensitive generated tokens (CTI) and the context cues of each (CCI).

    The prompt is `template` with `context` and `input` (the contextless one is `input`);
    `output` is forced, or generated (greedy, `max_new_tokens`) with the context. `method`: any
    fnattr method (name or function; `method_args` go to it), attributing each selected step
    with `cci_target(contrast)`. `groups`: a splitter of the context ("sentences", ...) to
    report groups instead of context tokens. `chat=True` writes both prompts as the user's turn
    of the tokenizer's chat template (rendered here, so the two prompts differ only by the
    context; its tokens are attributed as ordinary tokens).

    Returns a result with one step per context-sensitive token (`steps` their target
    positions): `source` [1 step src] its attribution, reduced by the method's default
    reduction, the context's tokens marked by `source_groups` (one group, the whole context);
    with `groups`, `source` [1 step group] its attribution to the context's groups; `step_scores["cti"]` their CTI scores; `meta["cti"]` every step's
    score, the threshold and the selection; `meta["cci"]` per selected token its contrast
    token and its top `cci_top_k` context tokens or groups. `describe(out)` prints them.

    >>> out = pecore(model, tok, context="Paris is in France.", input="Where is Paris?")
    >>> print(describe(out))
    """
    from fnattr.api import get_method
    from fnattr.render.views import view

    if cti_metric not in ("kl", "pcxmi"):
        raise ValueError(f"`cti_metric`={cti_metric!r}: use 'kl' or 'pcxmi'.")
    if cci_top_k < 1:
        raise ValueError(f"`cci_top_k`={cci_top_k}: report at least 1 context token.")
    fn = get_method(method)
    text, at = _prompt(context, input, template)
    contextless = template.replace("{context}", "").format(input=input).strip() or input
    if chat:
        text, contextless = _chat(tokenizer, text), _chat(tokenizer, contextless)
        start = text.find(context)
        at = (start, start + len(context))
    batch = prepare(model, tokenizer, [text], None if output is None else [output],
                    max_new_tokens=max_new_tokens, groups=[_spans(context, at, groups)])
    contrast = prepare_contrast(model, tokenizer, batch, contrast_sources=[contextless])
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=None,
                             attr_pos_end=None) as ctx:
        logits = clean_logits(ctx)
    scores = cti(contrast, batch.to(logits.device), logits, cti_metric)
    real = (batch.target_mask[0] & ~batch.target_special[0]).cpu()
    chosen, threshold = select(scores, real, cti_std)
    parts, cci = [], []
    # without `groups` the context's one group only marks its tokens: methods see single tokens
    attributed = batch if groups is not None else dataclasses.replace(
        batch, source_groups=None, source_group_texts=None, group_by=None)
    in_context = batch.source_groups[0].cpu() >= 0
    for t in chosen:
        c, y_alt, side = _cci_contrast(model, tokenizer, batch, contextless, contrast.logits.cpu(), t)
        out_t = view(fn(model, attributed, cci_target(c), attr_pos_start=t, attr_pos_end=t + 1,
                        **method_args))
        if groups is not None:
            out_t = out_t.grouped()  # perturbation methods return groups already
        parts.append(out_t)
        cci.append({"position": t, "token": batch.target_tokens[0][t],
                    "contrast_token": tokenizer.decode([y_alt]), "contrast": side,
                    "top": _top(out_t, cci_top_k, None if groups is not None else in_context)})
    meta = {"method": "pecore", "target_fn": fn_name(cci_target(contrast)),
            "cci_method": getattr(fn, "__name__", str(method)),
            "args": json.dumps({"cti_metric": cti_metric, "cti_std": cti_std, "chat": chat,
                                "cci_top_k": cci_top_k, "template": template,
                                "groups": None if groups is None else str(getattr(groups, "__name__", groups)),
                                **{k: repr(v) for k, v in method_args.items()}}),
            "cti": json.dumps({"metric": cti_metric, "scores": scores.tolist(),
                               "threshold": threshold, "selected": chosen}),
            "cci": json.dumps(cci), "context": context, "input": input,
            "group_by": "context" if groups is None else str(getattr(groups, "__name__", groups))}
    return _assemble(batch, parts, chosen, scores, meta)


def _chat(tokenizer, text: str) -> str:
    """`text` as the user's turn of the chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("`chat=True` but the tokenizer has no chat template: pass chat=False.")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    adds = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and adds and rendered.startswith(bos):  # the tokenizer adds it again: once is enough
        rendered = rendered[len(bos):]
    return rendered


def _top(out: AttributionTensors, k: int, in_context: Tensor | None) -> list[list[Any]]:
    """The `k` context tokens (`in_context` marks them) or groups (`out` grouped, `in_context`
    None) of largest |score| for the one step of `out`."""
    row = out.source[0, 0]
    cols = (in_context if in_context is not None else out.source_mask[0]).nonzero().squeeze(1)
    order = row[cols].abs().argsort(descending=True, stable=True)[:k]
    return [[float(row[cols[i]]), out.source_tokens[0][int(cols[i])]] for i in order.tolist()]


def _assemble(batch, parts: list[AttributionTensors], chosen: list[int], scores: Tensor,
              meta: dict[str, str]) -> AttributionTensors:
    n_src = batch.source_ids.shape[1]
    source = (torch.cat([p.source for p in parts], 1) if parts
              else torch.zeros(1, 0, n_src, dtype=scores.dtype))
    side = {"source_ids": batch.source_ids.cpu(), "source_mask": batch.source_mask.cpu(),
            "source_tokens": batch.source_tokens, "source_groups": batch.source_groups.cpu(),
            "group_texts": batch.source_group_texts}
    if parts:  # the reduction the parts record (`fnattr.views.view`), for `grouped()`
        meta = {**meta, "aggregations": parts[0].meta.get("aggregations", "[]")}
    if parts and parts[0].meta.get("grouped"):  # source axis: the context's groups
        side = {k: getattr(parts[0], k) for k in side}
        meta = {**meta, "grouped": parts[0].meta["grouped"]}
    target = (torch.cat([p.target for p in parts], 1) if parts and parts[0].target is not None
              else None)
    names = list(parts[0].step_scores) if parts else []
    step_scores = {k: torch.cat([p.step_scores[k] for p in parts], 1) for k in names}
    step_scores["cti"] = scores[chosen][None].to(source.dtype)
    return AttributionTensors(
        source=source, target=target, steps=torch.tensor(chosen, dtype=torch.long),
        step_scores=step_scores, target_ids=batch.target_ids.cpu(), target_mask=batch.target_mask.cpu(),
        target_tokens=batch.target_tokens, extra_dims=(), meta=meta, **side)


def describe(out: AttributionTensors) -> str:
    """The generated text with each context-sensitive token marked `[[token]]` and numbered,
    then, per marked token, its contrast and its top context tokens or groups."""
    info = json.loads(out.meta["cti"])
    marked = set(info["selected"])
    cci = {c["position"]: c for c in json.loads(out.meta["cci"])}
    real = out.target_mask[0].nonzero().squeeze(1).tolist()
    text, n = "", 0
    for j in real:
        tok = out.target_tokens[0][j]
        if j in marked:
            n += 1
            text += f"[[{tok}]]({n})"
        else:
            text += tok
    lines = [f"context-sensitive tokens ({info['metric']} > {info['threshold']:.4g}): {len(marked)}",
             text]
    for i, j in enumerate(sorted(marked), 1):
        c = cci[j]
        lines.append(f"({i}) {c['token']!r} (instead of {c['contrast_token']!r} without context):")
        lines += [f"    [{score:+.4g}] {label!r}" for score, label in c["top"]]
    return "\n".join(lines)

"""ContextCite (Cohen-Wang et al., NeurIPS 2024, arXiv:2409.00729): which source groups (documents,
sentences) of the prompt a generated span relies on, from a sparse linear surrogate fitted on
random ablations of the groups.

Each ablation keeps every group with probability `keep_prob` (the paper and its package: 0.5)
and removes the others; one teacher-forced forward of the ablated prompt scores every generated
step at once. A span's output is its target score summed over its steps (for `logprob`: the log
probability of the span), turned into the logit of that probability (the paper's target,
log p - log(1 - p)); a LASSO (`fnattr.context.solver.surrogate`, the package's solver) maps the
keep-masks to it. A group's score is its weight: the predicted change of the output when the
group is kept rather than removed. Held-out ablations measure the surrogate's fit: Spearman's
rank correlation between predicted and actual outputs (the paper's LDS), in `meta["lds"]`.
"""

import json
from typing import Any, Literal

import torch
from torch import Tensor

from fnattr.evaluate.removal import copy_scores
from fnattr.batch import Batch
from fnattr.context.solver import spearman, surrogate
from fnattr.engine import score_steps
from fnattr.groups import group_fields, kind, split_tokens, splitter
from fnattr import group_features as _grouped
from fnattr.attribution import (
    attribution_context, clean_logits, finish, fn_name, logit_step_scores,
)
from fnattr.methods.integrated_gradients import baselines
from fnattr.progress import report
from fnattr.result import AttributionTensors
from fnattr.targets import logprob
from fnattr.types import Model, TargetFn

Link = Literal["auto", "logit", "identity"]


def ablation_masks(n: int, n_groups: int, *, seed: int, keep_prob: float = 0.5) -> Tensor:
    """Keep-masks [n, n_groups] (True keeps a group), drawn group by group from `seed`: a row's
    masks depend only on the seed and its group count (so a batch equals its rows alone)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n_groups, n, generator=gen, dtype=torch.float64) < keep_prob).T


def target_spans(batch: Batch, spans: Any) -> list[list[list[int]]]:
    """Per row, the target positions of each span: "all" (the whole response, one span) or a
    splitter of the generated text ("sentences", ...); special tokens (EOS) belong to none."""
    out = []
    for b in range(len(batch)):
        real = (batch.target_mask[b] & ~batch.target_special[b]).nonzero().squeeze(1).tolist()
        if spans == "all":
            out.append([real] if real else [])
            continue
        out.append(split_tokens(batch.target_tokens[b], real, spans, row=b))
    return out


def _outputs(y: Tensor, positions: list[int], steps: Tensor, link: str) -> Tensor:
    """A span's output [n] from the copies' step scores y [n step]."""
    cols = [int((steps == p).nonzero()) for p in positions]
    total = y[:, cols].sum(1)
    if link == "identity":
        return total
    return total - torch.log(-torch.expm1(total.clamp(max=-1e-12)))  # log p - log(1 - p)


def _check(batch: Batch, n_ablations: int, n_heldout: int, keep_prob: float, alpha: float,
           ablation: str) -> None:
    if batch.source_groups is None:
        raise ValueError("context_cite attributes to source groups: prepare the batch with "
                         "`groups=` ('documents', 'sentences' as in the paper, ...).")
    if n_ablations < 2 or n_heldout < 0:
        raise ValueError(f"`n_ablations`={n_ablations} must be at least 2 (the paper uses 32 to "
                         f"256) and `n_heldout`={n_heldout} non-negative.")
    if not 0 < keep_prob < 1 or not alpha >= 0:
        raise ValueError(f"`keep_prob`={keep_prob} must be in (0, 1) and `lasso_alpha`={alpha} "
                         "non-negative.")
    if ablation not in ("remove", "baseline"):
        raise ValueError(f"`ablation`={ablation!r}: use 'remove' (drop the group's tokens, as "
                         "the paper) or 'baseline' (replace their embeddings).")


def context_cite(
    model: Model, batch: Batch, target_fn: TargetFn = logprob, *,
    n_ablations: int = 64, n_heldout: int = 16, seed: int = 0, keep_prob: float = 0.5,
    lasso_alpha: float = 0.01, spans: Any = "sentences", link: Link = "auto",
    ablation: Literal["remove", "baseline"] = "remove", baseline: str = "auto",
    internal_batch_size: int = 32, progress: bool = False,
) -> AttributionTensors:
    """ContextCite: one score per source group (`prepare(groups=...)`) for each generated span.

    `n_ablations` random ablations (each group kept with `keep_prob`, seeded by `seed`) fit the
    surrogate; `n_heldout` more measure its fit. `spans`: "sentences" (each generated sentence,
    default), "all" (the whole response) or another splitter. `link`: "logit" regresses on the
    logit of the span's probability (the paper; needs log-probability scores, `logprob`),
    "identity" on the summed scores; "auto" picks "logit" for `logprob`. `ablation="remove"`
    drops the ablated groups' tokens from the attention (on a decoder-only model exactly the
    prompt without them), "baseline" replaces their embeddings by `baseline` (as occlusion).

    Returns `source` [batch span group]: the surrogate's weights, with `source_tokens` the group
    texts and `target_tokens` the span texts (one column per span, `steps` 0..n_spans - 1);
    `step_scores[target]` the span's output with the whole context (in the `link` scale);
    `meta["lds"]` the held-out Spearman correlation per row and span, `meta["spans"]` the target
    positions of each span, `meta["intercepts"]` the surrogate's bias.

    >>> batch = prepare(model, tok, prompt, groups="documents", max_new_tokens=20)
    >>> out = context_cite(model, batch, n_ablations=64, seed=0)
    >>> out.citations(k=3)
    """
    _check(batch, n_ablations, n_heldout, keep_prob, lasso_alpha, ablation)
    name = fn_name(target_fn)
    link = ("logit" if name == "logprob" else "identity") if link == "auto" else link
    if link not in ("logit", "identity"):
        raise ValueError(f"`link`={link!r}: use 'auto', 'logit' or 'identity'.")
    spans_per_row = target_spans(batch, spans if spans == "all" else splitter(spans))
    args = {"n_ablations": n_ablations, "n_heldout": n_heldout, "seed": seed,
            "keep_prob": keep_prob, "lasso_alpha": lasso_alpha, "spans": kind(spans)
            if spans != "all" else "all", "link": link, "ablation": ablation,
            "internal_batch_size": internal_batch_size}
    if ablation == "baseline":  # named in meta["baseline"] only where it is used
        args["baseline"] = baseline
    total = n_ablations + n_heldout
    with (report(progress, "context_cite", unit="ablations") as bar,
          attribution_context(model, batch, attribute_target=False, attr_pos_start=None,
                              attr_pos_end=None) as ctx):
        src_ok = ctx.batch.source_mask & ~ctx.batch.source_special
        owned = [[g for g, _ in row] for row in _grouped.features(ctx, src_ok)]
        side, pos, real, counts, member = _grouped.lime_features(ctx, (src_ok, torch.zeros_like(
            ctx.batch.target_mask)))
        keep = torch.ones(len(counts), total, side.shape[1], dtype=torch.bool)
        for b, n in enumerate(counts):
            keep[b, :, :n] = ablation_masks(total, n, seed=seed, keep_prob=keep_prob)
        drop_src = _grouped.lime_source_masks(member, keep).to(src_ok.device)
        drop = torch.cat([drop_src, torch.zeros(len(drop_src), ctx.batch.target_ids.shape[1],
                                                dtype=torch.bool, device=src_ok.device)], 1)
        rows = torch.arange(len(counts), device=src_ok.device).repeat_interleave(total)
        fills = None if ablation == "remove" else baselines(ctx, baseline)
        bar.expect(len(rows))
        y = copy_scores(ctx, target_fn, rows, drop, fills, internal_batch_size).cpu()
        bar.advance(len(rows))
        logits = clean_logits(ctx)
        f_x = score_steps(target_fn, logits, ctx.batch, ctx.steps).detach().cpu()
        y = y.unflatten(0, (len(counts), total))
        out = finish(ctx, method="context_cite", args=args, target_fn=target_fn,
                     source=torch.zeros(*f_x.shape, ctx.batch.source_ids.shape[1], dtype=f_x.dtype,
                                        device=ctx.batch.source_ids.device),
                     target=None, step_scores=logit_step_scores(ctx, logits, target_fn, ()),
                     extra_dims=())
    return _result(out, ctx.steps.cpu(), y, f_x, keep, owned, spans_per_row, n_ablations,
                   lasso_alpha, link, name)


def _result(out: AttributionTensors, steps: Tensor, y: Tensor, f_x: Tensor, keep: Tensor,
            owned: list[list[int]], spans: list[list[list[int]]], n_fit: int, alpha: float,
            link: str, name: str) -> AttributionTensors:
    """The fitted surrogates as a result: source axis the groups, one column per span."""
    n_rows, n_spans = len(owned), max([len(s) for s in spans] + [1])
    width = max([len(t) for t in out.group_texts] + [1])
    scores = torch.zeros(n_rows, n_spans, width, dtype=f_x.dtype)
    full = torch.zeros(n_rows, n_spans, dtype=f_x.dtype)
    lds: list[list[float | None]] = []
    intercepts: list[list[float]] = []
    for b, row_spans in enumerate(spans):
        lds.append([])
        intercepts.append([])
        groups = torch.tensor(owned[b], dtype=torch.long)
        for s, positions in enumerate(row_spans):
            outputs = _outputs(y[b], positions, steps, link)
            full[b, s] = _outputs(f_x[b][None], positions, steps, link)[0]
            masks = keep[b, :, :len(owned[b])]
            w, bias = surrogate(masks[:n_fit], outputs[:n_fit], len(positions), alpha)
            scores[b, s, groups] = w.to(scores.dtype)
            intercepts[-1].append(float(bias))
            if len(outputs) > n_fit:
                predicted = masks[n_fit:].to(torch.float64) @ w + bias
                rho = spearman(predicted, outputs[n_fit:])
                lds[-1].append(None if rho != rho else rho)
    target_ids = torch.zeros(n_rows, n_spans, dtype=out.target_ids.dtype)
    target_mask = torch.zeros(n_rows, n_spans, dtype=torch.bool)
    texts = []
    for b, row_spans in enumerate(spans):
        row = []
        for s, positions in enumerate(row_spans):
            target_ids[b, s], target_mask[b, s] = out.target_ids[b, positions[0]], True
            row.append("".join(out.target_tokens[b][j] for j in positions))
        texts.append(tuple(row) + ("",) * (n_spans - len(row)))
    fields = group_fields(out, scores, out.source_groups, out.group_texts,
                          out.meta.get("group_by", "spans"), "sum")
    meta = {**fields.pop("meta"), "lds": json.dumps(lds), "intercepts": json.dumps(intercepts),
            "spans": json.dumps(spans), "link": link}
    return out.replace(**fields, meta=meta, steps=torch.arange(n_spans), target=None,
                       target_ids=target_ids, target_mask=target_mask,
                       target_tokens=tuple(texts), delta=None,
                       step_scores={"logit_prob" if link == "logit" else name:
                                    full * target_mask.to(full)})


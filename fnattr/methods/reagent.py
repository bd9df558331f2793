"""ReAGent (Zhao & Shan 2024, arXiv:2402.00794): replace random tokens with a language model's
proposals and credit the replaced tokens with the drop of the target score.

All steps share each probe: a probe replaces a random subset of the whole sequence, and step t
reads only its visible part (the source and the target tokens before t), so one forward of
`num_probes` rows updates every step still running. Each step stops on its own once keeping only
its top tokens (the rest replaced) puts the target in the model's top-k.
"""

import inspect
import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from fnattr.batch import Batch
from fnattr.engine import for_rows, forward
from fnattr.attribution import (
    Context, StepScoreSpec, at_input, attribution_context, clean_logits, finish, logit_step_scores,
)
from fnattr.methods._pos import PosTags, pos_proposals
from fnattr.methods._pos import pos_tags as _pos_tags
from fnattr.attribution import call_args
from fnattr.registry import attribution_method
from fnattr.progress import Reporter, report
from fnattr.result import AttributionTensors
from fnattr.targets import probability
from fnattr.types import Model, TargetFn


def _lm_probs(lm, ids: Tensor, mask: Tensor) -> Float[Tensor, "batch seq vocab"]:
    """A causal LM's proposal for each position p: its next-token distribution after p - 1; the
    first real token of a row, which has no prefix, takes the distribution that follows it."""
    kwargs = {"attention_mask": mask.long(), "use_cache": False}
    if "position_ids" in inspect.signature(lm.forward).parameters:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    probs = lm(input_ids=ids, **kwargs).logits.float().softmax(-1).nan_to_num(0.0)
    shifted = torch.cat([probs[:, :1], probs[:, :-1]], 1)
    has_prefix = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    return torch.where(has_prefix[..., None], shifted, probs)


def proposals(ctx: Context, clean_logits: Tensor, replacing_model) -> Float[Tensor, "batch seq vocab"]:
    """Replacement distributions for every source then target position, the original token excluded.

    Decoder-only: the replacing model (default: the attributed model) reading the clean prefix.
    Encoder-decoder: target tokens from the decoder's own predictions (or the replacing model),
    source tokens from the replacing model, uniform over the vocabulary without one.
    """
    b = ctx.batch
    vocab = clean_logits.shape[-1]
    if not b.is_encoder_decoder:
        lm = ctx.model if replacing_model is None else replacing_model
        ids = torch.cat([b.source_ids, b.target_ids], 1)
        probs = _lm_probs(lm, ids, torch.cat([b.source_mask, b.target_mask], 1))
    else:
        if replacing_model is None:
            src = clean_logits.new_full((*b.source_ids.shape, vocab), 1 / vocab, dtype=torch.float)
            tgt = clean_logits.float().softmax(-1)
        else:
            src = _lm_probs(replacing_model, b.source_ids, b.source_mask)
            tgt = _lm_probs(replacing_model, b.target_ids, b.target_mask)
        probs = torch.cat([src, tgt], 1)
    ids = torch.cat([b.source_ids, b.target_ids], 1)
    probs = probs[..., :vocab].scatter(-1, ids[..., None], 0.0)
    total = probs.sum(-1, keepdim=True)
    return torch.where(total > 0, probs / total.clamp(min=1e-30), 1 / vocab)


pos_tags = _pos_tags  # re-exported: `from fnattr.methods.reagent import pos_tags`


def _sample(probs: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """`n` samples per position: [n, batch, seq]."""
    flat = probs.flatten(0, 1)
    out = torch.multinomial(flat, n, replacement=True, generator=generator)
    return out.T.reshape(n, *probs.shape[:2])


def _scores(ctx: Context, ids: Tensor, rows: Tensor, target_fn: TargetFn) -> tuple[Tensor, Tensor]:
    """Logits and target scores of every step for token ids [rows, src+tgt] of batch rows `rows`."""
    n_src = ctx.batch.source_ids.shape[1]
    src = ctx.handle.embed(ids[:, :n_src], "source")
    tgt = ctx.handle.embed(ids[:, n_src:], "target")
    logits = forward(ctx.model, ctx.batch, ctx.handle, src, tgt, ctx.embedded.start, rows)
    fn = for_rows(at_input(ctx, target_fn, src, tgt, rows), rows)
    return logits, fn(logits, ctx.batch.target_ids[rows])


def credit(
    drop: Float[Tensor, "probe batch step"], replaced: Bool[Tensor, "probe batch seq"],
    visible: Bool[Tensor, "batch step seq"],
) -> Float[Tensor, "batch step seq"]:
    """Sum over probes: +drop for each replaced visible token, -drop for each kept one."""
    sign = replaced.to(drop.dtype) * 2 - 1
    return torch.einsum("pbk,pbs->bks", drop, sign) * visible


def kept(
    importance: Float[Tensor, "*n seq"], visible: Bool[Tensor, "*n seq"],
    keep_top_n: int | None, keep_ratio: float | None, invert: bool,
) -> Bool[Tensor, "*n seq"]:
    """The visible tokens each step keeps: its top-n (or top ratio) by importance; inverted, the rest."""
    n_visible = visible.sum(-1, keepdim=True)
    if keep_ratio is not None:
        n_keep = (n_visible * keep_ratio).ceil().long()
    else:
        n_keep = n_visible.clamp(max=keep_top_n)
    order = torch.sort(importance.masked_fill(~visible, -math.inf), dim=-1, descending=True,
                       stable=True).indices
    rank = torch.sort(order, dim=-1, stable=True).indices
    top = (rank < n_keep) & visible
    return visible & ~top if invert else top


def _run(ctx: Context, ids: Tensor, rows: Tensor, target_fn: TargetFn, chunk: int):
    """Target scores [n, step] and the target's rank among the logits [n, step] of token rows."""
    scores, ranks = [], []
    steps, tgt = ctx.steps, ctx.batch.target_ids
    for lo in range(0, len(rows), chunk):
        r = rows[lo:lo + chunk]
        logits, s = _scores(ctx, ids[lo:lo + chunk], r, target_fn)
        picked = logits[:, steps]
        own = picked.gather(-1, tgt[r][:, steps, None])
        scores.append(s[:, steps])
        ranks.append((picked > own).sum(-1))
    return torch.cat(scores), torch.cat(ranks)


def _check_rows(ctx, ids, importance, visible, active, probs, opts, g):
    """One row per running step: its kept tokens as they are, its other visible tokens replaced."""
    b, k = active.nonzero().unbind(1)
    keep = kept(importance[b, k], visible[b, k], opts["keep_top_n"], opts["keep_ratio"],
                opts["invert_keep"])
    fresh = _sample(probs[b.cpu()], 1, g)[0].to(ids.device)
    return torch.where(visible[b, k] & ~keep, fresh, ids[b]), b, k


def _probe(ctx: Context, target_fn: TargetFn, probs: Tensor, opts: dict, g: torch.Generator,
           bar: Reporter):
    """The probe loop of every step at once; returns importance, converged flags, probe steps.
    `bar` counts the rounds (up to `max_probe_steps` + 1, the last one only checking) and shows
    how many steps still run."""
    batch, steps, dev = ctx.batch, ctx.steps, ctx.steps.device
    ids = torch.cat([batch.source_ids, batch.target_ids], 1)
    n_src, seq = batch.source_ids.shape[1], ids.shape[1]
    tgt_cand = batch.target_mask & ~batch.target_special
    cand = torch.cat([batch.source_mask & ~batch.source_special,
                      tgt_cand if ctx.attribute_target else torch.zeros_like(tgt_cand)], 1)
    pos = torch.arange(seq, device=dev)
    visible = cand[:, None, :] & ((pos < n_src)[None] | (pos - n_src < steps[:, None]))[None]
    with torch.no_grad():
        base, _ = _run(ctx, ids, torch.arange(len(batch), device=dev), target_fn, opts["chunk"])
    total = torch.zeros(*visible.shape, dtype=base.dtype, device=dev)
    used = torch.zeros_like(base)
    converged = torch.zeros_like(visible[..., 0])
    active = batch.target_mask[:, steps] & visible.any(-1)
    n = opts["num_probes"]
    n_steps, rounds = int(active.sum()) if bar.enabled else 0, 0
    bar.expect(opts["max_probe_steps"] + 1)
    for it in range(opts["max_probe_steps"] + 1):
        if not active.any():
            break
        if bar.enabled:
            bar.update(detail=f"{int(active.sum())} of {n_steps} steps running")
        parts, owners = [], []
        if it > 0:  # check the importance of the previous iterations, in the same forward
            check, cb, ck = _check_rows(ctx, ids, total / used.clamp(min=1)[..., None], visible,
                                        active, probs, opts, g)
            parts.append(check)
            owners.append(cb)
        probing = it < opts["max_probe_steps"]
        if probing:
            rows = active.any(1).nonzero().squeeze(1)
            swap = (torch.rand(n, len(rows), seq, generator=g) < opts["replacing_ratio"]).to(dev)
            swap &= cand[rows]
            new = torch.where(swap, _sample(probs[rows.cpu()], n, g).to(dev), ids[rows])
            parts.append(new.flatten(0, 1))
            owners.append(rows.repeat(n))
        with torch.no_grad():
            scores, ranks = _run(ctx, torch.cat(parts), torch.cat(owners), target_fn, opts["chunk"])
        if it > 0:
            a = len(cb)
            hit = ranks[torch.arange(a, device=dev), ck] < opts["top_k"]
            stop = ~hit if opts["invert_keep"] else hit
            converged[cb[stop], ck[stop]] = True
            active[cb[stop], ck[stop]] = False
            scores = scores[a:]
        if probing:
            drop = (base[rows] - scores.view(n, len(rows), -1)) * active[rows]
            total[rows] += credit(drop, swap, visible[rows])
            used[rows] += n * active[rows]
        rounds += 1
        bar.advance()
    if bar.enabled:
        bar.update(detail=f"{int(converged.sum())} of {n_steps} steps converged", total=rounds)
    return total / used.clamp(min=1)[..., None], converged, used / n


@attribution_method(family="perturbations", reduction="sum")
def reagent(
    model: Model, batch: Batch, target_fn: TargetFn = probability, *,
    keep_top_n: int | None = 3, keep_ratio: float | None = None, invert_keep: bool = False,
    stopping_condition_top_k: int = 3, replacing_ratio: float = 0.3, max_probe_steps: int = 3000,
    num_probes: int = 16, replacing_model: nn.Module | None = None,
    pos_tags: PosTags | None = None,
    generator: torch.Generator | int = 0, internal_batch_size: int = 64,
    attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """ReAGent (Zhao & Shan 2024, arXiv:2402.00794), a model-agnostic recursive attribution.

    Each probe step replaces a random `replacing_ratio` of the tokens (special tokens never) by
    tokens sampled from `replacing_model` (default: the attributed model itself; source tokens of
    encoder-decoder models: uniform when none is given) and credits every replaced token with the
    drop of the target score, every kept token with minus that drop; `num_probes` probes run per
    step. A step stops once keeping only its `keep_top_n` (or `keep_ratio`) most important tokens,
    the rest replaced, puts the target in the top `stopping_condition_top_k` (with `invert_keep`:
    replacing those tokens pushes it out), or after `max_probe_steps`. `generator` seeds it all.
    `pos_tags` (built by `pos_tags(tokenizer, tag_fn)` from a tag function of your own: fnattr
    ships no tagger) samples each replacement uniformly among the vocabulary tokens with the
    replaced token's part of speech instead (`pos_proposals`), as ReAGent's POS sampler does.
    `progress=True` shows the probe rounds and the steps still running on stderr (the total is
    the `max_probe_steps` cap, so its ETA is an upper bound).

    Returns `source` [batch step src] and `target` [batch step tgt]: the mean credit per probe.
    Step scores "reagent_converged" (1 if the stopping condition was met, else 0: never NaN) and
    "reagent_probe_steps" report how each step ended; meta "reagent_unconverged" counts the rest.

    >>> out = reagent(model, batch, generator=0, max_probe_steps=100)
    """
    _validate(keep_top_n, keep_ratio, stopping_condition_top_k, replacing_ratio, max_probe_steps,
              num_probes, internal_batch_size)
    args = call_args(reagent, locals())
    opts = {"keep_top_n": keep_top_n, "keep_ratio": keep_ratio, "invert_keep": invert_keep,
            "top_k": stopping_condition_top_k, "replacing_ratio": replacing_ratio,
            "max_probe_steps": max_probe_steps, "num_probes": num_probes,
            "chunk": internal_batch_size}
    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    with (report(progress, "reagent", unit="probe rounds") as bar,
          attribution_context(model, batch, attribute_target=attribute_target,
                              attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx):
        logits = clean_logits(ctx)
        with torch.no_grad():
            probs = proposals(ctx, logits, replacing_model).cpu()
            if pos_tags is not None:
                probs = pos_proposals(ctx, probs, pos_tags)
        importance, converged, used = _probe(ctx, target_fn, probs, opts, g, bar)
        scores = logit_step_scores(ctx, logits, target_fn, step_scores)
        step_mask = ctx.batch.target_mask[:, ctx.steps]
        scores["reagent_converged"] = converged.to(importance.dtype) * step_mask
        scores["reagent_probe_steps"] = used.to(importance.dtype) * step_mask
        n_src = ctx.batch.source_ids.shape[1]
        out = finish(ctx, method="reagent", args=args, target_fn=target_fn,
                     source=importance[..., :n_src],
                     target=importance[..., n_src:] if ctx.attribute_target else None,
                     step_scores=scores, extra_dims=())
    missing = int((step_mask & ~converged).sum())
    return out.replace(meta={**out.meta, "reagent_unconverged": str(missing)})


def _validate(keep_top_n, keep_ratio, top_k, replacing_ratio, max_probe_steps, num_probes, chunk):
    if keep_ratio is None and (keep_top_n is None or keep_top_n < 0):
        raise ValueError(f"`keep_top_n`={keep_top_n}: give a count >= 0, or set `keep_ratio`.")
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise ValueError(f"`keep_ratio`={keep_ratio}: it must be in (0, 1].")
    if not 0 <= replacing_ratio <= 1:
        raise ValueError(f"`replacing_ratio`={replacing_ratio}: it must be in [0, 1].")
    for name, value in (("stopping_condition_top_k", top_k), ("max_probe_steps", max_probe_steps),
                        ("num_probes", num_probes), ("internal_batch_size", chunk)):
        if value < 1:
            raise ValueError(f"`{name}`={value}: it must be at least 1.")

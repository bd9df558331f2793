"""Target functions: (logits of every step, target ids) -> one score per step.

Plain functions: pass any callable of the same form (see `fnattr.types.TargetFn`). Functions that
need more than the logits (a contrastive input, dropout samples) are built by factories that run
the extra forward once for all steps, without gradients, and return a plain target function:

>>> contrast = fnattr.contrast.prepare_contrast(model, tok, batch, contrast_targets=["Rome."])
>>> out = saliency(model, batch, contrast_prob_diff(contrast), step_scores=["entropy"])

Notation: z_t are the logits of step t, p_t = softmax(z_t), y_t the target token; primes mark
the contrastive input (z'_t, p'_t, y'_t at the contrast step aligned with t). With
`contrast_context="same"` (the default) and `contrast_targets` only, z'_t = z_t: the foil y'_t is
scored under the attributed prefix, p_t(y'_t) = p(y'_t | x, y_<t) (Yin & Neubig 2022; inseq).
"""

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from fnattr._check import typechecked
from fnattr.batch import Batch
from fnattr.contrast import Contrast
from fnattr.engine import embed, forward
from fnattr.hooks.attention import eager_experts, finite_masks
from fnattr.hooks.dropout import enable_dropout, has_dropout
from fnattr.hooks.embedding import embedding_hooks
from fnattr.hooks.frozen import frozen
from fnattr.types import Logits, Model, StepScores, TargetFn, TargetIds


def _pick(values: Logits, target_ids: TargetIds) -> StepScores:
    return values.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


@typechecked
def logit(logits: Logits, target_ids: TargetIds) -> StepScores:
    """The raw logit of the target token: `z_t[y_t]`."""
    return _pick(logits, target_ids)


@typechecked
def logprob(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Log-probability of the target token: `log softmax(z_t)[y_t]`."""
    return _pick(logits.log_softmax(-1), target_ids)


@typechecked
def probability(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Probability of the target token: `softmax(z_t)[y_t]` (the default target)."""
    return _pick(logits.softmax(-1), target_ids)


@typechecked
def entropy(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Entropy of the next-token distribution, in nats: `H_t = -sum_v p_t(v) log p_t(v)`."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@typechecked
def crossentropy(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Cross-entropy of the target token (its negative log-likelihood): `CE_t = -log p_t(y_t)`."""
    return -logprob(logits, target_ids)


@typechecked
def perplexity(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Per-step perplexity `PPL_t = exp(CE_t) = 1 / p_t(y_t)`.

    The sequence perplexity `exp(mean_t CE_t)` is the geometric mean of these over the steps.
    """
    return crossentropy(logits, target_ids).exp()


def _attached(logits: Logits, value: Tensor) -> StepScores:
    """`value` as a score of these logits: its gradient with respect to the input is zero."""
    return value.to(logits.dtype) + logits[..., 0].nan_to_num(0.0, 0.0, 0.0) * 0


def _nucleus(probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """True at the `top_k` most likely tokens (0: all) that form the smallest set of mass >= top_p."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_k`={top_k}, `top_p`={top_p}: need top_k >= 0 and 0 < top_p <= 1.")
    n = probs.shape[-1]
    if top_p >= 1.0 and top_k in (0, n):
        return torch.ones_like(probs, dtype=torch.bool)
    k = min(n, top_k or 64)
    while True:  # the k most likely tokens, sorted; widen k until each nucleus closes inside
        values, order = probs.sort(-1, descending=True) if k == n else probs.topk(k, -1)
        if k == n or k == top_k or bool((values.sum(-1) >= top_p).all()):
            break
        k = n if 32 * k > n else 4 * k  # a full sort beats a top-k of most of the vocabulary
    keep = (values.cumsum(-1) - values) < top_p  # mass before the token is still short of top_p
    keep[..., 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)


@typechecked
def top_p_size(logits: Logits, target_ids: TargetIds, *, top_p: float = 0.9) -> StepScores:
    """Size of the nucleus (Holtzman et al. 2020, arXiv:1904.09751): the fewest tokens whose
    probability adds up to at least `top_p`: `min |V| s.t. sum_{v in V} p_t(v) >= top_p`.

    A count (zero gradient). Other `top_p`: `functools.partial(top_p_size, top_p=0.5)`.
    """
    with torch.no_grad():
        size = _nucleus(logits.softmax(-1), 0, top_p).sum(-1)
    return _attached(logits, size)


def _check_rows(name: str, own_ids: Tensor, target_ids: Tensor) -> bool:
    """Whether data held for `own_ids`' rows must be broadcast (one row) to `target_ids`' rows."""
    if own_ids.shape == target_ids.shape and torch.equal(own_ids, target_ids):
        return False
    if own_ids.shape[0] == 1 and own_ids.shape[1:] == target_ids.shape[1:] and torch.equal(
            own_ids.expand_as(target_ids), target_ids):
        return True
    raise ValueError(
        f"`{name}` holds data for {own_ids.shape[0]} batch rows of {own_ids.shape[1]} steps but got "
        f"target ids {tuple(target_ids.shape)} that are not those rows. A method that runs "
        "perturbed copies of a batch must call `target_fn.at_rows(rows)` first; otherwise "
        "attribute one example at a time (a one-row batch serves any number of copies).")


def bind(name: str, score: Callable[..., Tensor], own_ids: Tensor, *data: Tensor) -> TargetFn:
    """A target function `score(logits, target_ids, *data)` over per-batch-row `data`.

    `data` tensors have the batch rows first and belong to the rows whose target ids are
    `own_ids`; `fn.at_rows(rows)` gives the function for the rows `rows` of that batch (row i
    of the logits belongs to batch row rows[i]), as a method running perturbed copies needs.
    """
    def target(logits: Logits, target_ids: TargetIds) -> StepScores:
        if _check_rows(name, own_ids, target_ids):
            rows = torch.zeros(len(target_ids), dtype=torch.long, device=own_ids.device)
            return score(logits, target_ids, *(d[rows] for d in data))
        return score(logits, target_ids, *data)

    def at_rows(rows: Tensor) -> TargetFn:
        rows = rows.to(own_ids.device)
        return bind(name, score, own_ids[rows], *(d[rows] for d in data))

    target.__name__ = target.__qualname__ = name
    target.at_rows = at_rows
    return target


@typechecked
def _contrast_logit(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                    c_ids: TargetIds) -> StepScores:
    return _attached(logits, _pick(c_logits, c_ids))


@typechecked
def _contrast_prob(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                   c_ids: TargetIds) -> StepScores:
    return _attached(logits, _pick(c_logits.softmax(-1), c_ids))


@typechecked
def _contrast_logprob(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                      c_ids: TargetIds) -> StepScores:
    return _attached(logits, _pick(c_logits.log_softmax(-1), c_ids))


@typechecked
def _logit_diff(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                c_ids: TargetIds) -> StepScores:
    return _pick(logits, target_ids) - _pick(c_logits, c_ids)


@typechecked
def _prob_diff(logits: Logits, target_ids: TargetIds, c_logits: Logits,
               c_ids: TargetIds) -> StepScores:
    return _pick(logits.softmax(-1), target_ids) - _pick(c_logits.softmax(-1), c_ids)


@typechecked
def _logprob_diff(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                  c_ids: TargetIds) -> StepScores:
    return _pick(logits.log_softmax(-1), target_ids) - _pick(c_logits.log_softmax(-1), c_ids)


@typechecked
def _log2_ratio(logits: Logits, target_ids: TargetIds, c_logits: Logits,
                c_ids: TargetIds) -> StepScores:
    c_logp = _pick(c_logits.log_softmax(-1), c_ids)
    return (_pick(logits.log_softmax(-1), target_ids) - c_logp) / math.log(2)


def _swapped(score: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def swapped(logits: Logits, target_ids: TargetIds, c_logits: Logits, c_ids: TargetIds) -> StepScores:
        return score(c_logits.to(logits.dtype), c_ids, logits, target_ids)
    return swapped


def _on_own_logits(score: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def same(logits: Logits, target_ids: TargetIds, c_ids: TargetIds) -> StepScores:
        return score(logits, target_ids, logits, c_ids)
    return same


def _contrast(name: str, score: Callable[..., Tensor], contrast: Contrast) -> TargetFn:
    """`score(logits, target_ids, z', y')` over the contrast's one forward at the clean input.

    The function also carries `contrast` and `with_contrast(logits', rows)`: a method that
    reruns the contrast at a perturbed input (`fnattr.contrast.rerun`) scores with those
    logits instead, so the contrastive term depends on the attributed input as it should.
    """
    if contrast.reads_attributed:  # same context, same input: y'_t scored on these logits
        fn = bind(name, _on_own_logits(score), contrast.target_ids, contrast.ids)
        fn.contrast = contrast
        return fn
    if contrast.swapped:  # attributed input = the contrast's: the terms change places back
        score = _swapped(score)
    fn = bind(name, score, contrast.target_ids, contrast.logits, contrast.ids)

    def with_contrast(c_logits: Tensor, rows: Tensor | None) -> TargetFn:
        c_ids = contrast.ids if rows is None else contrast.ids[rows.to(contrast.ids.device)]

        def target(logits: Logits, target_ids: TargetIds) -> StepScores:
            return score(logits, target_ids, c_logits, c_ids)

        target.__name__ = target.__qualname__ = name
        return target

    fn.contrast, fn.with_contrast = contrast, with_contrast
    return fn


def contrast_logits(contrast: Contrast) -> TargetFn:
    """Logit of the contrast token under the contrastive input: `z'_t[y'_t]`.

    {gradient}"""
    return _contrast("contrast_logits", _contrast_logit, contrast)


def contrast_prob(contrast: Contrast, *, logprob: bool = False) -> TargetFn:
    """Probability of the contrast token under the contrastive input: `p'_t(y'_t)`
    (`logprob=True`: `log p'_t(y'_t)`, in nats, as inseq's `logprob` option).

    {gradient}"""
    _check_flag("logprob", logprob)
    return _contrast("contrast_prob", _contrast_logprob if logprob else _contrast_prob, contrast)


def contrast_logits_diff(contrast: Contrast) -> TargetFn:
    """Contrastive logit difference (Yin & Neubig 2022, arXiv:2202.10419): `z_t[y_t] - z'_t[y'_t]`.

    {gradient}"""
    return _contrast("contrast_logits_diff", _logit_diff, contrast)


def contrast_prob_diff(contrast: Contrast, *, logprob: bool = False) -> TargetFn:
    """Contrastive probability difference (Yin & Neubig 2022): `p_t(y_t) - p'_t(y'_t)`
    (`logprob=True`: `log p_t(y_t) - log p'_t(y'_t)`, in nats).

    {gradient}"""
    _check_flag("logprob", logprob)
    return _contrast("contrast_prob_diff", _logprob_diff if logprob else _prob_diff, contrast)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}`={value!r}: pass True or False.")


def pcxmi(contrast: Contrast) -> TargetFn:
    """Pointwise conditional cross-mutual information (Fernandes et al. 2021, arXiv:2109.07446),
    in bits: `P-CXMI_t = log2 p_t(y_t | x, C, y_<t) - log2 p'_t(y_t | x, y_<t)`.

    The attributed input holds the context C; the contrast (`contrast_sources`) leaves it out.
    Positive where the context makes y_t more likely.

    {gradient}"""
    return _contrast("pcxmi", _log2_ratio, contrast)


def in_context_pvi(contrast: Contrast) -> TargetFn:
    """In-context pointwise V-usable information (Lu et al. 2023, arXiv:2310.12300), in bits:
    `PVI_t = log2 p_t(y_t | x, y_<t) - log2 p'_t(y_t | x_null, y_<t)`.

    The attributed input holds the instance x; the contrast (`contrast_sources`) holds the same
    prompt with x left out (the null input). Positive where x makes y_t more likely.

    {gradient}"""
    return _contrast("in_context_pvi", _log2_ratio, contrast)


FILTER_STRATEGIES = ("merged", "original", "contrast")


def _filtered(scores: Tensor, top_k: int, top_p: float, min_keep: int) -> Tensor:
    """True at the tokens that inseq's `filter_logits` keeps by the logits `scores`: the nucleus
    of mass `top_p` of softmax(scores), then the `top_k` highest of those (ties kept); each
    filter keeps at least `min_keep` tokens."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if top_p < 1.0:
        values, order = scores.softmax(-1).sort(-1, descending=True)
        kept = (values.cumsum(-1) - values) < top_p  # mass before the token is still short of top_p
        kept[..., :min_keep] = True
        keep = torch.zeros_like(keep).scatter(-1, order, kept)
    if top_k > 0:
        masked = scores.masked_fill(~keep, -math.inf)
        kth = masked.topk(min(max(top_k, min_keep), scores.shape[-1]), -1).values[..., -1:]
        keep = keep & (masked >= kth)
    return keep


def kl_divergence(contrast: Contrast, *, top_k: int = 0, top_p: float = 1.0,
                  min_tokens_to_keep: int = 1, filter_strategy: str = "merged") -> TargetFn:
    """KL divergence of the contrastive from the attributed next-token distribution (Sarti et
    al. 2023, PECoRe, arXiv:2310.01188): `KL_t = sum_{v in V_t} q_t(v) log(q_t(v) / q'_t(v))`,
    in nats. V_t is one set of tokens for both sides, chosen as inseq's `filter_logits` chooses
    it from the logits of `filter_strategy`: "merged" (default) z_t + z'_t, "original" z_t,
    "contrast" z'_t; of their softmax the nucleus of mass `top_p` (1: all), then its `top_k`
    highest tokens (0: all), each filter keeping at least `min_tokens_to_keep`. q_t, q'_t are p_t,
    p'_t restricted to V_t and renormalised. Unlike inseq, which returns NaN once filtering is on
    (0 * log 0 at the masked tokens), this is finite: the tokens outside V_t weigh exactly 0.

    The contrast must change the prefix the distributions are conditioned on: `contrast_sources`,
    or `contrast_targets` with `contrast_context="own"`. With `contrast_targets` only in the same
    context p'_t = p_t and the KL would be 0 at every step, so that case raises.

    {gradient}"""
    if top_k < 0 or not 0.0 < top_p <= 1.0 or min_tokens_to_keep < 1:
        raise ValueError(f"`top_k`={top_k}, `top_p`={top_p}, `min_tokens_to_keep`={min_tokens_to_keep}:"
                         " need top_k >= 0 (0: no top-k), 0 < top_p <= 1 and min_tokens_to_keep >= 1.")
    if filter_strategy not in FILTER_STRATEGIES:
        raise ValueError(f"`filter_strategy`={filter_strategy!r}: use one of {FILTER_STRATEGIES} "
                         "(the logits the kept tokens are chosen by: z + z', z or z').")
    if contrast.reads_attributed:
        raise ValueError("`kl_divergence` with `contrast_targets` only and contrast_context='same' "
                         "compares p(. | x, y_<t) with itself (0 at every step): pass "
                         "contrast_context='own' (the contrast target's own prefix) or "
                         "`contrast_sources`.")

    @typechecked
    def _kl(logits: Logits, target_ids: TargetIds, c_logits: Logits, c_ids: TargetIds) -> StepScores:
        c_logits = c_logits.to(logits.dtype)
        keep = torch.ones_like(logits, dtype=torch.bool)
        if top_k > 0 or top_p < 1.0:
            by = {"merged": logits + c_logits, "original": logits, "contrast": c_logits}
            keep = _filtered(by[filter_strategy].detach(), top_k, top_p, min_tokens_to_keep)
        low = torch.finfo(logits.dtype).min  # masked tokens get probability 0, finite logs
        logq = logits.masked_fill(~keep, low).log_softmax(-1)
        logq_c = c_logits.masked_fill(~keep, low).log_softmax(-1)
        return torch.where(keep, logq.exp() * (logq - logq_c), 0).sum(-1)

    return _contrast("kl_divergence", _kl, contrast)


def _seeded(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _pick_logprob(logits: Logits, target_ids: TargetIds) -> StepScores:
    return logprob(logits, target_ids)


@typechecked
def _constant(logits: Logits, target_ids: TargetIds, values: StepScores) -> StepScores:
    return _attached(logits, values)


def mc_dropout_prob_avg(
    model: Model, batch: Batch, *, n_mcd_steps: int = 10, seed: int = 0,
    internal_batch_size: int = 64, logprob: bool = False,
) -> TargetFn:
    """Monte-Carlo dropout average probability (Gal & Ghahramani 2016, arXiv:1506.02142):
    `(1/K) sum_{k=1..K} p^(k)_t(y_t)`, with K = `n_mcd_steps` forwards whose dropout masks differ
    (`logprob=True`: the mean of the log-probabilities, `(1/K) sum_k log p^(k)_t(y_t)`).

    The K samples run as copies of the batch in one no-grad pass (chunks of at most
    `internal_batch_size` rows), with only the dropout in training mode: `torch.nn` dropout
    modules and modules calling dropout functionally with a positive rate, e.g. Bart or Marian
    layers (`fnattr.hooks.enable_dropout`, restored after). Seeded by `seed` without touching
    the global RNG. A constant of the attributed input: use it as a step score.
    """
    if n_mcd_steps < 1 or internal_batch_size < 1:
        raise ValueError(f"`n_mcd_steps`={n_mcd_steps}, `internal_batch_size`={internal_batch_size}: "
                         "both must be at least 1.")
    _check_flag("logprob", logprob)
    if bool(model.config.is_encoder_decoder) != batch.is_encoder_decoder:
        raise ValueError("`batch` was prepared for another kind of model: call prepare() with this model.")
    if not has_dropout(model):
        raise ValueError(f"{type(model).__name__} has no dropout with a rate above 0 (no torch.nn "
                         "dropout module with p > 0, no module with a positive `*dropout` rate): MC "
                         "dropout would equal `probability`. Set e.g. `model.config.dropout` before "
                         "loading, or use a model trained with dropout.")
    score = _pick_logprob if logprob else probability
    batch = batch.to(model.device)
    total = torch.zeros(batch.target_ids.shape, dtype=model.dtype, device=model.device)
    copies = torch.arange(len(batch), device=model.device).repeat(n_mcd_steps)
    with torch.no_grad(), frozen(model), finite_masks(model), eager_experts(model), \
            enable_dropout(model), embedding_hooks(model) as handle, \
            _seeded(model.device):
        torch.manual_seed(seed)
        emb = embed(handle, batch)
        for rows in copies.split(internal_batch_size):
            logits = forward(model, batch, handle, emb.source[rows], emb.target[rows], emb.start, rows)
            total.index_add_(0, rows, score(logits, batch.target_ids[rows]).to(total.dtype))
    return bind("mc_dropout_prob_avg", _constant, batch.target_ids, total / n_mcd_steps)


_GRADIENT = """Context: with `contrast_targets`, the contrast token y'_t is scored under the
    attributed target prefix by default (`contrast_context="same"`: p(y'_t | x, y_<t), as Yin &
    Neubig 2022 and inseq), or under the contrast's own prefix (`contrast_context="own"`:
    p(y'_t | x, y'_<t)); see `fnattr.contrast`.

    Gradient: with `contrast_targets` only in the same context both terms read the attributed
    forward's logits, so the attributions are those of the whole expression. Otherwise, where
    the contrast shares a side with the attributed input (the source, or with `contrast_sources`
    the target prefix), methods rerun the contrast at each perturbed input on that side, so the
    attributions are again those of the whole expression (both terms). With both sides
    replaced (`contrast_sources` and `contrast_targets` in the own context) the contrast is a
    constant: its terms have zero gradient and only the attributed
    input's terms are attributed. Wrapping the function in another callable loses the rerun
    (constant contrast)."""

for _fn in (contrast_logits, contrast_prob, contrast_logits_diff, contrast_prob_diff, pcxmi,
            in_context_pvi, kl_divergence):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ = _fn.__doc__.replace("{gradient}", _GRADIENT)

# Built-in target functions by name (for `step_scores=["entropy", ...]`, the CLI). A read-only
# table of this module's functions; user functions are passed directly, never registered.
TARGETS: Mapping[str, TargetFn] = MappingProxyType({
    "probability": probability, "logprob": logprob, "logit": logit, "entropy": entropy,
    "crossentropy": crossentropy, "perplexity": perplexity, "top_p_size": top_p_size,
})

# Factories `(contrast, **options) -> TargetFn` by name, for `fnattr.attribute(...,
# contrast_targets=...)`, which builds the `Contrast` and the function.
CONTRAST_TARGETS: Mapping[str, Callable[..., TargetFn]] = MappingProxyType({
    "contrast_logits": contrast_logits, "contrast_prob": contrast_prob,
    "contrast_logits_diff": contrast_logits_diff, "contrast_prob_diff": contrast_prob_diff,
    "pcxmi": pcxmi, "kl_divergence": kl_divergence, "in_context_pvi": in_context_pvi,
})

# Factories `(model, batch, **options) -> TargetFn` by name (they run the model themselves).
MODEL_TARGETS: Mapping[str, Callable[..., TargetFn]] = MappingProxyType({
    "mc_dropout_prob_avg": mc_dropout_prob_avg,
})

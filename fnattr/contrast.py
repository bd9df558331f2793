"""Contrastive inputs: one no-grad forward of an alternative source/target, aligned to the target.

"Why y rather than y'?" (Yin & Neubig 2022, arXiv:2202.10419): `prepare_contrast` keeps, for every
target position t, the contrast token y'_t aligned with t and the logits it is scored on. The
contrastive target functions of `fnattr.targets` (`contrast_prob_diff(contrast)`, ...) read them.

Two contexts for a contrast token (`contrast_context`):
- "same" (the default; Yin & Neubig, inseq's `contrast_prob_fn`): the foil is scored under the
  attributed target prefix, p(y'_t | x', y_<t), with x' = x unless `contrast_sources` are given.
  With `contrast_targets` only, the contrast's logits are the attributed forward's own.
- "own": the foil is scored under the contrast's own prefix, p(y'_t | x', y'_<t) (the contrast
  target run as a sequence of its own; fnattr's default until this change).
With `contrast_sources` only the two coincide (the target is the attributed one).
"""

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fnattr._check import typechecked
from fnattr.batch import Batch, prepare
from fnattr.engine import Embedded, embed, forward
from fnattr.hooks.attention import eager_experts, finite_masks
from fnattr.hooks.embedding import EmbeddingHandle, embedding_hooks
from fnattr.hooks.frozen import frozen
from fnattr.types import Model

Pairs = Sequence[tuple[int, int]]
Alignments = Literal["auto"] | Pairs | Sequence[Pairs] | None
ContrastContext = Literal["same", "own"]


@typechecked
@dataclasses.dataclass(frozen=True)
class Contrast:
    """The contrastive side of a batch, aligned with its target positions.

    - `logits[b, t]`: contrast logits at the contrast step aligned with target position t.
    - `ids[b, t]`: the contrast token at that step (what the contrast input predicts there).
    - `target_ids`: the attributed batch's target ids (to check which rows a function gets).
    - `alignments[b]`: the (target position, contrast position) pairs used for row b.
    - `batch`, `embedded`, `index`, `shared`: the contrast batch, its embeddings, the contrast
      position aligned with each
      target position, and the side it shares with the attributed batch ("source" when only
      `contrast_targets` were given, "target" when only `contrast_sources` were; None when both
      differ). A method reruns the contrast at its perturbed input on the shared side
      (`rerun`), so the contrastive term carries its gradient; without a shared side the
      contrast is a constant of the attributed input.
    """

    logits: Float[Tensor, "batch tgt vocab"]
    ids: Int[Tensor, "batch tgt"]
    target_ids: Int[Tensor, "batch tgt"]
    alignments: tuple[tuple[tuple[int, int], ...], ...]
    batch: Batch | None = None
    embedded: Embedded | None = None
    index: Int[Tensor, "batch tgt"] | None = None
    shared: Literal["source", "target"] | None = None
    # `force_inputs`: the attributed input is the contrast's and `batch` the original's, so the
    # target functions swap their two terms back (the expression stays p - p', not p' - p)
    swapped: bool = False
    # which prefix the contrast tokens are scored under ("same": the attributed target's)
    context: ContrastContext = "own"
    # the contrast's input is the attributed input (contrast_context="same", contrast_targets
    # only): `logits` are the attributed forward's, and the target functions score y'_t on the
    # logits they are given, so both terms carry their gradient without a second forward
    reads_attributed: bool = False


def align_tokens(target: Sequence[int], contrast: Sequence[int]) -> list[tuple[int, int]]:
    """Align every target position with a contrast position by matching tokens ("auto").

    Equal runs of tokens (difflib's longest matching blocks) align one to one; a replaced run
    aligns position by position (its tail to the last replacing token); a target run with no
    counterpart aligns with the contrast token that stands where it would be. Contrast tokens
    with no target counterpart are left out.

    >>> align_tokens([5, 6, 7], [5, 9, 9, 7])
    [(0, 0), (1, 1), (2, 3)]
    """
    if not target or not contrast:
        raise ValueError("cannot align an empty sequence: both target and contrast need tokens.")
    pairs = []
    matcher = difflib.SequenceMatcher(a=list(target), b=list(contrast), autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        for i in range(i1, i2):
            if op == "equal":
                pairs.append((i, j1 + i - i1))
            elif op == "replace":
                pairs.append((i, j1 + min(i - i1, j2 - j1 - 1)))
            elif op == "delete":
                pairs.append((i, min(j1, len(contrast) - 1)))
    return pairs


def _row_pairs(alignments: Alignments, n_rows: int) -> list[Pairs | None | str]:
    """One alignment spec per row: "auto", None (identity) or explicit pairs."""
    if alignments is None or isinstance(alignments, str):
        if isinstance(alignments, str) and alignments != "auto":
            raise ValueError(f"`contrast_targets_alignments`={alignments!r}: use 'auto', None, or "
                             "(target position, contrast position) pairs.")
        return [alignments] * n_rows
    alignments = list(alignments)
    flat = all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) for v in p)
               for p in alignments)
    if flat:
        return [alignments] * n_rows
    if len(alignments) != n_rows:
        raise ValueError(f"`contrast_targets_alignments` has {len(alignments)} lists of pairs for "
                         f"{n_rows} rows: give one list per row, or one list for every row.")
    return alignments


def _positions(spec: Pairs | None | str, tgt: list[int], con: list[int], row: int) -> list[int]:
    """The contrast position of every target position of one row: the named one, else the one as
    far from the contrast's end as t is from the target's (inseq's fill of unaligned positions:
    the last target token with the last contrast token, and so on backwards)."""
    if spec == "auto":
        spec = align_tokens(tgt, con)
    named = {}
    for pair in spec or ():
        t, c = (int(v) for v in pair)
        if not (0 <= t < len(tgt) and 0 <= c < len(con)):
            raise ValueError(f"`contrast_targets_alignments` pair {tuple(pair)} of row {row} is out "
                             f"of range: target positions are 0..{len(tgt) - 1}, contrast positions "
                             f"0..{len(con) - 1}.")
        if named.setdefault(t, c) != c:
            raise ValueError(f"`contrast_targets_alignments` aligns target position {t} of row {row} "
                             "twice: give one contrast position per target position.")
    out = []
    for t in range(len(tgt)):
        c = named.get(t, len(con) - len(tgt) + t)
        if c < 0:
            raise ValueError(f"target position {t} of row {row} has no contrast position: the contrast "
                             f"has {len(con)} tokens, the target {len(tgt)}, and unnamed positions align "
                             f"from the end. Pass contrast_targets_alignments='auto' or a pair ({t}, j).")
        out.append(c)
    return out


def _texts(texts: str | Sequence[str] | None, n: int, name: str) -> tuple[str, ...] | None:
    if texts is None:
        return None
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if len(texts) != n:
        raise ValueError(f"`{name}` has {len(texts)} texts for a batch of {n}: give one per row.")
    return texts


def contrast_batch(
    model: Model, tokenizer: PreTrainedTokenizerBase, batch: Batch, *,
    contrast_targets: str | Sequence[str] | None = None,
    contrast_sources: str | Sequence[str] | None = None,
) -> Batch:
    """The batch of contrastive inputs: each side either the contrast texts or `batch`'s own ids."""
    c_tgt = _texts(contrast_targets, len(batch), "contrast_targets")
    c_src = _texts(contrast_sources, len(batch), "contrast_sources")
    if c_tgt is None and c_src is None:
        raise ValueError("no contrast given: pass `contrast_targets` and/or `contrast_sources`.")
    # Forced targets: nothing is generated. A side without contrast texts keeps the batch's ids.
    try:
        made = prepare(model, tokenizer, c_src or batch.sources, c_tgt or c_src)
    except ValueError as err:  # name the contrast arguments, not prepare's
        raise ValueError(f"contrast_sources / contrast_targets: {err}") from None
    keep = ([] if c_src else ["source"]) + ([] if c_tgt else ["target"])
    fields = {f"{side}_{key}": getattr(batch, f"{side}_{key}")
              for side in keep for key in ("ids", "mask", "special", "tokens")}
    fields.update({f"{side}s": getattr(batch, f"{side}s") for side in keep})
    return dataclasses.replace(made, **fields)


def prepare_contrast(
    model: Model, tokenizer: PreTrainedTokenizerBase, batch: Batch, *,
    contrast_targets: str | Sequence[str] | None = None,
    contrast_sources: str | Sequence[str] | None = None,
    contrast_targets_alignments: Alignments = None,
    contrast_context: ContrastContext = "same",
) -> Contrast:
    """Run the contrastive input once (no grad, eval mode) and align it with `batch`'s targets.

    `contrast_targets`: alternative target texts ("why y rather than y'"); `contrast_sources`:
    alternative inputs (e.g. without context); either or both, one per row. Alignment of target
    position t with a contrast position, as inseq aligns them: None aligns the positions from the
    end (the last target token with the last contrast token, and so on; position by position
    for equal lengths), "auto" matches tokens (`align_tokens`), explicit (t, j) pairs (one list
    for all rows or one per row) set the named positions and align the others from the end.

    `contrast_context`: "same" (default) scores each contrast token y'_t under the attributed
    target prefix, p(y'_t | x', y_<t) (Yin & Neubig 2022; inseq); "own" under the contrast's own
    prefix, p(y'_t | x', y'_<t). Returns a `Contrast` on the model's device.

    >>> contrast = prepare_contrast(model, tok, batch, contrast_targets=["Rome."])
    >>> out = saliency(model, batch, fnattr.targets.contrast_prob_diff(contrast))
    """
    if contrast_context not in ("same", "own"):
        raise ValueError(f"`contrast_context`={contrast_context!r}: use 'same' (the contrast token "
                         "under the attributed target prefix) or 'own' (under its own prefix).")
    cb = contrast_batch(model, tokenizer, batch, contrast_targets=contrast_targets,
                        contrast_sources=contrast_sources)
    specs = _row_pairs(contrast_targets_alignments, len(batch))
    lengths = batch.target_mask.sum(1).tolist(), cb.target_mask.sum(1).tolist()
    index = torch.zeros_like(batch.target_ids)
    for row, (spec, n_t, n_c) in enumerate(zip(specs, *lengths)):
        tgt, con = batch.target_ids[row, :n_t].tolist(), cb.target_ids[row, :n_c].tolist()
        index[row, :n_t] = torch.as_tensor(_positions(spec, tgt, con, row))
    if contrast_targets is not None and contrast_context == "same":
        return _same_context(model, tokenizer, batch, contrast_sources, cb, index, lengths[0])
    shared = "target" if contrast_targets is None else "source" if contrast_sources is None else None
    run = _run_other(model, cb, batch, index, lengths[0], shared, swapped=False)
    return dataclasses.replace(run, context=contrast_context)


def _same_context(model: Model, tokenizer: PreTrainedTokenizerBase, batch: Batch,
                  contrast_sources: str | Sequence[str] | None, cb: Batch, index: Tensor,
                  lengths: Sequence[int]) -> Contrast:
    """The contrast of `contrast_context="same"`: the contrast target `cb`'s tokens at `index`,
    scored under the attributed target prefix (and `contrast_sources` where given)."""
    foil = cb.target_ids.to(model.device).gather(1, index.to(model.device))
    pairs = tuple(tuple((t, int(index[r, t])) for t in range(n)) for r, n in enumerate(lengths))
    identity = torch.arange(batch.target_ids.shape[1]).expand_as(batch.target_ids)
    if contrast_sources is None:  # the contrast input is the attributed input
        batch = batch.to(model.device)
        with torch.no_grad(), frozen(model), finite_masks(model), eager_experts(model), \
                embedding_hooks(model) as handle:
            emb = embed(handle, batch)
            logits = forward(model, batch, handle, emb.source, emb.target, emb.start)
        return Contrast(logits=logits, ids=foil, target_ids=batch.target_ids, alignments=pairs,
                        context="same", reads_attributed=True)
    other = contrast_batch(model, tokenizer, batch, contrast_sources=contrast_sources)
    run = _run_other(model, other, batch, identity.clone(), lengths, "target", swapped=False)
    return dataclasses.replace(run, ids=foil, alignments=pairs, context="same")


def _run_other(model: Model, other: Batch, attributed: Batch, index: Tensor, lengths: Sequence[int],
               shared: Literal["source", "target"] | None, *, swapped: bool) -> Contrast:
    """The `Contrast` of `other` (run once, no grad) for the attributed batch `attributed`:
    `index[b, t]` is the position of `other` aligned with the attributed target position t."""
    other, index = other.to(model.device), index.to(model.device)
    with torch.no_grad(), frozen(model), finite_masks(model), eager_experts(model), \
                embedding_hooks(model) as handle:
        emb = embed(handle, other)
        logits = forward(model, other, handle, emb.source, emb.target, emb.start)
    pairs = tuple(tuple((t, int(index[r, t])) for t in range(n)) for r, n in enumerate(lengths))
    return Contrast(logits=_aligned(logits, index), ids=other.target_ids.gather(1, index),
                    target_ids=attributed.target_ids.to(model.device), alignments=pairs,
                    batch=other, embedded=emb, index=index, shared=shared, swapped=swapped)


def force_inputs(model: Model, batch: Batch, contrast: Contrast) -> tuple[Batch, Contrast]:
    """Attribute on the contrast's own inputs (inseq's `contrast_force_inputs`): returns the
    contrast batch, to attribute, and a `Contrast` holding `batch`, the original input.

    The contrastive target functions built on it score the same expression as before
    (`contrast_prob_diff`: p(y | x) - p'(y' | x')), now as a function of the contrastive input
    x' / y': its terms carry the gradient, and the original's terms are rerun where it shares a
    side with it, constant where not. The alignment must pair every target position with a
    distinct contrast position and leave none out (e.g. equal lengths, no alignment given).
    Attributing on (x', y') scores each contrast token under its own prefix, so a contrast with
    `contrast_targets` must come from `prepare_contrast(..., contrast_context="own")`.

    >>> c_batch, forced = force_inputs(model, batch, prepare_contrast(model, tok, batch, ...))
    >>> out = saliency(model, c_batch, fnattr.targets.contrast_prob_diff(forced))
    """
    if contrast.context == "same" and (contrast.reads_attributed or not torch.equal(
            contrast.ids, contrast.batch.target_ids.gather(1, contrast.index))):
        raise ValueError("`contrast_force_inputs` attributes on the contrast's own input (x', y'), "
                         "where each contrast token is scored under its own prefix: pass "
                         "contrast_context='own' with it.")
    if contrast.batch is None or contrast.index is None or contrast.swapped:
        raise ValueError("`contrast` must come from prepare_contrast() (and not be forced already).")
    cb = contrast.batch
    n_t, n_c = batch.target_mask.sum(1).tolist(), cb.target_mask.sum(1).tolist()
    inverse = torch.zeros_like(cb.target_ids, device="cpu")
    for row, (a, b) in enumerate(zip(n_t, n_c)):
        index = contrast.index[row, :a].cpu()
        if a != b or not torch.equal(index.sort().values, torch.arange(b)):
            raise ValueError(f"`contrast_force_inputs`: row {row} aligns its {a} target positions with "
                             f"{b} contrast positions, not one to one, so the contrast's steps have no "
                             "single original step each: use contrast targets of the same length "
                             "with contrast_targets_alignments=None, or one-to-one pairs.")
        inverse[row, index] = torch.arange(a, dtype=inverse.dtype)
    return cb, _run_other(model, batch, cb, inverse, n_c, contrast.shared, swapped=True)


def _aligned(logits: Tensor, index: Tensor) -> Tensor:
    """Contrast logits at the contrast position aligned with each target position."""
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


def rerun(
    contrast: Contrast, model: Model, handle: EmbeddingHandle,
    source: Float[Tensor, "rows src d"], target: Float[Tensor, "rows tgt d"],
    start: Float[Tensor, "1 1 d"] | None, rows: Int[Tensor, " rows"] | None,
) -> Float[Tensor, "rows tgt vocab"] | None:
    """The aligned contrast logits when the attributed input is `source`/`target` (rows `rows`
    of the batch), with their autograd graph; None when the contrast shares no side with it.

    The shared side of the contrast reads the given (perturbed) embeddings, the other side its
    own tokens, so d(contrast term)/d(input) is that of the full contrastive expression.
    """
    if contrast.shared is None or contrast.batch is None or contrast.embedded is None:
        return None
    cb = contrast.batch
    if rows is None:
        rows = torch.arange(len(cb), device=cb.target_ids.device)
    own = contrast.embedded
    src = source if contrast.shared == "source" else own.source[rows]
    tgt = target if contrast.shared == "target" else own.target[rows]
    return _aligned(forward(model, cb, handle, src, tgt, start, rows), contrast.index[rows])


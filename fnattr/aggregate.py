"""Pure functions over AttributionTensors: reduce `*extra` dims, normalize, merge tokens, subtract."""

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnattr import registry
from fnattr.result import AttributionTensors


def _meta_json(out: AttributionTensors, key: str, default: Any) -> Any:
    try:
        return json.loads(out.meta[key]) if key in out.meta else default
    except (TypeError, ValueError):
        return default


def aggregations(out: AttributionTensors) -> list[tuple[str, list]]:
    """The reductions and merges applied to `out` so far (`meta["aggregations"]`), in order."""
    steps = _meta_json(out, "aggregations", [])
    return [(str(s[0]), s[1] if isinstance(s[1], list) else [s[1]]) for s in steps
            if isinstance(s, list) and len(s) == 2] if isinstance(steps, list) else []


def default_reduction(out: AttributionTensors) -> str:
    """The reduction the views apply to `out`'s extra dims unless told another: the one its
    method declares (`fnattr.registry`), and the L2 norm for bare gradients."""
    how = registry.reduction(out.meta.get("method", ""))
    args = _meta_json(out, "args", {})
    if how == "sum" and isinstance(args, dict) and args.get("multiply_by_inputs") is False:
        return "l2"  # bare gradients (not times the input) are not additive
    return how

Reducer = Callable[[Tensor, tuple[int, ...]], Tensor]

REDUCERS: dict[str, Reducer] = {
    "sum": lambda t, d: t.sum(d),
    "mean": lambda t, d: t.mean(d),
    "l2": lambda t, d: torch.linalg.vector_norm(t, ord=2, dim=d),
    "max": lambda t, d: t.amax(d),
    "absmax": lambda t, d: t.flatten(-len(d)).gather(
        -1, t.flatten(-len(d)).abs().argmax(-1, keepdim=True)).squeeze(-1),
}


def _reducer(how: str | Reducer) -> Reducer:
    if callable(how):
        return how
    if how not in REDUCERS:
        raise ValueError(f"`how`={how!r} is not a reduction: use one of {sorted(REDUCERS)} or a "
                         "function (tensor, dims) -> tensor.")
    return REDUCERS[how]


def reduce(
    out: AttributionTensors, how: str | Reducer = "sum", dims: Sequence[str] | None = None
) -> AttributionTensors:
    """Reduce the named `*extra` dimensions (default: all) of `source` and `target` with `how`.

    >>> reduce(out, "l2").source.shape   # [batch step src]
    """
    names = tuple(out.extra_dims if dims is None else dims)
    unknown = [n for n in names if n not in out.extra_dims]
    if unknown:
        raise ValueError(f"`dims` {unknown} are not among the result's extra dims {out.extra_dims}.")
    if not names:
        return out
    fn = _reducer(how)
    # Move the reduced dims last (in any order the caller named them), then reduce them together.
    keep = [d for d in out.extra_dims if d not in names]
    order = [3 + out.extra_dims.index(d) for d in (*keep, *names)]
    axes = tuple(range(-len(names), 0))

    def apply(t: Tensor | None) -> Tensor | None:
        return None if t is None else fn(t.permute(0, 1, 2, *order), axes)

    meta = dict(out.meta)
    steps = json.loads(meta.get("aggregations", "[]")) + [[getattr(how, "__name__", how), list(names)]]
    meta["aggregations"] = json.dumps(steps)
    return out.replace(source=apply(out.source), target=apply(out.target),
                       extra_dims=tuple(keep), meta=meta)


# ---- normalize ----------------------------------------------------------------------------

def _per_step(out: AttributionTensors, stat: Callable[[Tensor], Tensor], name: str) -> AttributionTensors:
    """Divide every score of a step by `stat` of that step's scores (source and target together)."""
    parts = [out.source.flatten(2)] + ([] if out.target is None else [out.target.flatten(2)])
    total = stat(torch.cat(parts, dim=2))  # [batch step]
    scale = torch.where(total > 0, total, torch.ones_like(total))
    extra = (None,) * (out.source.ndim - 2)

    def apply(t: Tensor | None) -> Tensor | None:
        return None if t is None else t / scale[(..., *extra)]

    return out.replace(source=apply(out.source), target=apply(out.target), delta=None,
                       meta=_record(out.meta, name, []))


def normalize(out: AttributionTensors) -> AttributionTensors:
    """Scale each step so that the absolute values of its scores sum to 1 (all-zero steps stay 0).

    `delta` is dropped: it no longer measures completeness after scaling.
    """
    return _per_step(out, lambda t: t.abs().sum(-1), "normalize")


def rescale(out: AttributionTensors) -> AttributionTensors:
    """Scale each step so that its largest absolute score is 1 (all-zero steps stay 0)."""
    return _per_step(out, lambda t: t.abs().amax(-1), "rescale")


def _record(meta: dict[str, str], name: str, args: list) -> dict[str, str]:
    steps = json.loads(meta.get("aggregations", "[]")) + [[name, args]]
    return {**meta, "aggregations": json.dumps(steps)}


# ---- difference ---------------------------------------------------------------------------

def difference(a: AttributionTensors, b: AttributionTensors) -> AttributionTensors:
    """`a - b` scorewise (e.g. a run against its contrastive run); step scores common to both too.

    Both must attribute the same tokens and steps with the same shapes.
    """
    for name in ("source_tokens", "target_tokens", "extra_dims"):
        if getattr(a, name) != getattr(b, name):
            first = next((i for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name)))
                          if x != y), min(len(getattr(a, name)), len(getattr(b, name))))
            raise ValueError(f"cannot subtract: `{name}` differ (first at row {first}: "
                             f"{_at(getattr(a, name), first)!r} vs {_at(getattr(b, name), first)!r}); "
                             "compare attributions of the same tokens.")
    if not torch.equal(a.steps, b.steps) or a.source.shape != b.source.shape:
        raise ValueError(f"cannot subtract: steps {a.steps.tolist()} vs {b.steps.tolist()}, shapes "
                         f"{tuple(a.source.shape)} vs {tuple(b.source.shape)}: attribute the same steps.")
    if (a.target is None) != (b.target is None):
        raise ValueError("cannot subtract: only one of the two attributes the target side.")
    common = [k for k in a.step_scores if k in b.step_scores]
    return a.replace(
        source=a.source - b.source, target=None if a.target is None else a.target - b.target,
        step_scores={k: a.step_scores[k] - b.step_scores[k] for k in common}, delta=None,
        meta=_record(a.meta, "difference", [b.meta.get("method", "")]),
    )


def _at(seq: Sequence, i: int):
    return seq[i] if i < len(seq) else "<missing>"


# ---- merging tokens into words or spans ---------------------------------------------------

Groups = list[list[list[int]]]  # per batch row, per merged unit: positions on the original axis


def _pool(t: Tensor, axis: int, groups: Groups, width: int, fn: Reducer) -> Tensor:
    """Reduce `t` [batch ...] along `axis` over each row's groups -> that axis has `width` units."""
    moved = t.movedim(axis, -1)
    out = moved.new_zeros(*moved.shape[:-1], width)
    for b, row in enumerate(groups):
        for w, idx in enumerate(row):
            if idx:
                out[b, ..., w] = fn(moved[b, ..., idx], (-1,))
    return out.movedim(-1, axis)


def _side(ids: Tensor, tokens: tuple[tuple[str, ...], ...], groups: Groups, width: int,
          labels: list[list[str]] | None):
    new_ids = torch.zeros(len(groups), width, dtype=ids.dtype)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    names = []
    for b, row in enumerate(groups):
        for w, idx in enumerate(row):
            new_ids[b, w], mask[b, w] = ids[b, idx[0]], True
        texts = labels[b] if labels is not None else ["".join(tokens[b][i] for i in g) for g in row]
        names.append(tuple(texts) + ("",) * (width - len(row)))
    return new_ids, mask, tuple(names)


def _check_groups(groups: Groups, mask: Tensor, side: str) -> None:
    if len(groups) != mask.shape[0]:
        raise ValueError(f"`{side}` groups have {len(groups)} rows; the result has {mask.shape[0]}.")
    for b, row in enumerate(groups):
        flat = sorted(i for g in row for i in g)
        real = mask[b].nonzero().squeeze(1).tolist()
        if flat != real or any(not g for g in row):
            raise ValueError(f"`{side}` groups of row {b} must split its {len(real)} real positions "
                             f"{real} into non-empty groups, each position once; got {row}.")


def merge(
    out: AttributionTensors, *, source: Groups | None = None, target: Groups | None = None,
    how: str | Reducer = "sum", steps_how: str | Reducer = "mean",
    source_labels: list[list[str]] | None = None, target_labels: list[list[str]] | None = None,
) -> AttributionTensors:
    """Merge token positions into units (words, spans): `source[b]` / `target[b]` list the
    positions of each unit of row b, covering every real position once, in order.

    Scores of a unit's tokens combine with `how`; merged target units are also merged steps,
    whose scores (and step scores, delta) combine with `steps_how` over the unit's attributed
    steps. A target unit J scores step unit K only when J comes before K (J < K).
    Works with any `*extra` dims (reduce them before or after: sums commute).
    """
    fn, step_fn = _reducer(how), _reducer(steps_how)
    if source is None:
        source = [[[i] for i in r.nonzero().squeeze(1).tolist()] for r in out.source_mask]
    if target is None:
        target = [[[j] for j in r.nonzero().squeeze(1).tolist()] for r in out.target_mask]
    _check_groups(source, out.source_mask, "source")
    _check_groups(target, out.target_mask, "target")
    old_steps = out.steps.tolist()
    step_groups = [[[k for k, s in enumerate(old_steps) if s in g] for g in row] for row in target]
    keep = sorted({w for row in step_groups for w, ks in enumerate(row) if ks})
    step_groups = [[row[w] if w < len(row) else [] for w in keep] for row in step_groups]
    ws, wt = max(map(len, source)), max(map(len, target))
    src = _pool(_pool(out.source, 2, source, ws, fn), 1, step_groups, len(keep), step_fn)
    tgt = None
    new_steps = torch.tensor(keep, dtype=out.steps.dtype)
    if out.target is not None:
        tgt = _pool(_pool(out.target, 2, target, wt, fn), 1, step_groups, len(keep), step_fn)
        visible = torch.arange(wt)[None, :] < new_steps[:, None]  # [step tgt]
        tgt = tgt * visible[(None, ..., *(None,) * (tgt.ndim - 3))]
    sids, smask, stok = _side(out.source_ids, out.source_tokens, source, ws, source_labels)
    tids, tmask, ttok = _side(out.target_ids, out.target_tokens, target, wt, target_labels)
    pool_steps = lambda t: None if t is None else _pool(t, 1, step_groups, len(keep), step_fn)  # noqa: E731
    return out.replace(
        source=src, target=tgt, steps=new_steps, source_ids=sids, source_mask=smask,
        target_ids=tids, target_mask=tmask, source_tokens=stok, target_tokens=ttok,
        source_groups=None, group_texts=None,  # merged units need not follow the groups
        step_scores={k: pool_steps(v) for k, v in out.step_scores.items()},
        delta=pool_steps(out.delta),
        meta=_record(out.meta, "merge", [getattr(how, "__name__", how),
                                         getattr(steps_how, "__name__", steps_how)]),
    )


# ---- word boundaries, detected from the tokenizer ------------------------------------------

Scheme = str  # "sentencepiece" ("▁" marks a space), "bytelevel" ("Ġ" = space byte), "wordpiece" ("##")
_BYTE_WS = {chr(256 + b): chr(b) for b in (9, 10, 11, 12, 13, 32)}  # GPT-2 byte-to-unicode table
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def word_scheme(tokenizer: Any) -> Scheme:
    """How `tokenizer` marks word boundaries, read from its pipeline (or, failing that, its vocab)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        desc = f"{backend.decoder!r} {backend.pre_tokenizer!r}"
        if "ByteLevel" in desc:
            return "bytelevel"
        if "Metaspace" in desc or "\u2581" in desc:
            return "sentencepiece"
        if "WordPiece" in desc:
            return "wordpiece"
    if hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    if hasattr(tokenizer, "byte_encoder"):
        return "bytelevel"
    vocab = tokenizer.get_vocab()
    counts = {s: sum(t.startswith(m) for t in vocab) for s, m in
              (("sentencepiece", "\u2581"), ("bytelevel", "\u0120"), ("wordpiece", "##"))}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        raise ValueError(f"cannot tell how {type(tokenizer).__name__} marks words (no '\u2581', 'Ġ' "
                         "or '##' tokens): merge with `merge_spans` or `merge_regex` instead.")
    return best


def _surface(token: str, scheme: Scheme) -> str:
    """The raw token's text with its boundary marker turned back into whitespace."""
    if scheme == "sentencepiece":
        return _SP_BYTE.sub(lambda m: chr(int(m.group(1), 16)), token.replace("\u2581", " "))
    if scheme == "bytelevel":
        return "".join(_BYTE_WS.get(c, c) for c in token)
    return token


def word_groups(
    tokens: Sequence[str], scheme: Scheme, special: Sequence[bool] | None = None
) -> list[list[int]]:
    """Group raw tokens (`convert_ids_to_tokens`) into words: a word starts at a token that begins
    with whitespace (for wordpiece: that lacks "##"), after a newline or tab, and at and after
    special tokens."""
    special = special or [False] * len(tokens)
    groups: list[list[int]] = []
    prev = ""
    for i, tok in enumerate(tokens):
        text = _surface(tok, scheme)
        if scheme == "wordpiece":
            start = not tok.startswith("##")
        else:
            # a bare space marker ("▁", "Ġ") prefixes the next token; a newline or tab ends a word
            start = text[:1].isspace() or (prev[-1:].isspace() and prev[-1:] != " ")
        if not groups or start or special[i] or special[i - 1]:
            groups.append([])
        groups[-1].append(i)
        prev = text
    return groups


def _real_groups(mask: Tensor, make: Callable[[int, list[int]], list[list[int]]]) -> Groups:
    """`make(b, real)` groups the real positions of row b (indices into `real`); -> positions."""
    out = []
    for b, row in enumerate(mask):
        real = row.nonzero().squeeze(1).tolist()
        out.append([[real[i] for i in g] for g in make(b, real)] if real else [])
    return out


def merge_words(
    out: AttributionTensors, tokenizer: Any, *, how: str | Reducer = "sum",
    steps_how: str | Reducer = "mean", scheme: Scheme | None = None,
) -> AttributionTensors:
    """Merge subword tokens into words on both sides, boundaries read from `tokenizer`
    (SentencePiece "▁", byte-level BPE "Ġ" and WordPiece "##" are detected, not assumed).

    >>> words = merge_words(reduce(out, "sum"), tokenizer)
    >>> words.source_tokens   # (("The", " capital", ...),)
    """
    scheme = scheme or word_scheme(tokenizer)
    specials = set(tokenizer.all_special_ids)
    groups, labels = {}, {}
    for side in ("source", "target"):
        ids = getattr(out, f"{side}_ids").tolist()

        def make(b: int, real: list[int]) -> list[list[int]]:
            row = [ids[b][i] for i in real]
            raw = tokenizer.convert_ids_to_tokens(row)
            return word_groups(raw, scheme, [i in specials for i in row])

        groups[side] = _real_groups(getattr(out, f"{side}_mask"), make)
        labels[side] = [[tokenizer.decode([ids[b][i] for i in g]) for g in row]
                        for b, row in enumerate(groups[side])]
    return merge(out, source=groups["source"], target=groups["target"], how=how,
                 steps_how=steps_how, source_labels=labels["source"], target_labels=labels["target"])


def span_groups(n: int, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Groups of `n` positions where each `[start, end)` span is one group, the rest singletons."""
    owner = list(range(n))
    for start, end in sorted(spans):
        if not 0 <= start < end <= n:
            raise ValueError(f"span ({start}, {end}) is outside the {n} real tokens: "
                             f"use 0 <= start < end <= {n}.")
        if len(set(owner[start:end])) != end - start or owner[start] != start:
            raise ValueError(f"span ({start}, {end}) overlaps another span: spans must be disjoint.")
        owner[start:end] = [start] * (end - start)
    groups: dict[int, list[int]] = {}
    for i, o in enumerate(owner):
        groups.setdefault(o, []).append(i)
    return list(groups.values())


def regex_groups(texts: Sequence[str], pattern: str | re.Pattern) -> list[list[int]]:
    """Groups of tokens whose text overlaps the same match of `pattern` in the joined text
    (e.g. r"\\S+" for words, r"[^.!?]+[.!?]*" for sentences); unmatched tokens stay alone."""
    joined, bounds, pos = "".join(texts), [], 0
    for t in texts:
        bounds.append((pos, pos + len(t)))
        pos += len(t)
    matches = [m.span() for m in re.finditer(pattern, joined) if m.end() > m.start()]
    groups: dict[object, list[int]] = {}
    for i, (lo, hi) in enumerate(bounds):
        key = next((j for j, (a, b) in enumerate(matches) if a < hi and lo < b), ("alone", i))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def merge_spans(
    out: AttributionTensors, *, source: Sequence[tuple[int, int]] = (),
    target: Sequence[tuple[int, int]] = (), how: str | Reducer = "sum", steps_how: str | Reducer = "mean",
) -> AttributionTensors:
    """Merge `[start, end)` ranges of real (unpadded) token positions, the same for every row."""
    return merge(out, source=_real_groups(out.source_mask, lambda b, r: span_groups(len(r), source)),
                 target=_real_groups(out.target_mask, lambda b, r: span_groups(len(r), target)),
                 how=how, steps_how=steps_how)


def merge_regex(
    out: AttributionTensors, pattern: str | re.Pattern = r"\S+", *, how: str | Reducer = "sum",
    steps_how: str | Reducer = "mean",
) -> AttributionTensors:
    """Merge tokens that fall in the same match of `pattern` over each side's decoded text."""
    groups = {}
    for side in ("source", "target"):
        tokens = getattr(out, f"{side}_tokens")
        groups[side] = _real_groups(getattr(out, f"{side}_mask"), lambda b, real: regex_groups(
            [tokens[b][i] for i in real], pattern))
    return merge(out, source=groups["source"], target=groups["target"], how=how, steps_how=steps_how)

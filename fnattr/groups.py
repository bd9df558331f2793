"""Feature groups: words, sentences, lines, chat turns, documents or your own character spans.

A group is a set of source tokens that a question is about ("which retrieved document made the
model say this?"). `prepare(..., groups=...)` records, for every source token, the index of its
group (`Batch.source_groups`, -1 for a token in no group) and each group's text; every method's
result carries them, `out.grouped()` reduces its scores to one per group, and the perturbation
methods (`occlusion`, `lime`) perturb whole groups natively (one copy per group).

Rules, the same for every splitter:
- A splitter maps a text to character spans `[start, end)`; a token belongs to the first group
  whose span its characters overlap, so groups never split a token (a token that straddles two
  spans goes to the first).
- Tokens that overlap no span are in no group (-1): BOS/EOS and other special tokens the
  tokenizer adds (their offsets are empty), a chat template's role headers and markers, and the
  whitespace between groups that a token of its own holds. Grouped views leave them out;
  perturbation methods never perturb them.
- Under `chat=True` the splitters (and your spans) apply to the user's text (`Batch.sources`),
  except `messages`, which makes one group per turn of the rendered chat prompt: the system
  message's content (if `system=` is given) and the user's. Template tokens stay in no group.
  The system turn's tokens are template tokens, which methods leave unattributed unless
  `prepare(..., keep_template=True)`.
- Splitters that find a span without tokens (possible only inside one token) drop it; your own
  spans must each get at least one token.
"""

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fnattr import aggregate

__all__ = ["SPLITTERS", "attach", "documents", "grouped", "lines", "messages", "sentences",
           "splitter", "ungrouped", "words"]

Span = tuple[int, int]
Splitter = Callable[[str], list[Span]]


def _stripped(text: str, start: int, end: int) -> Span | None:
    """`[start, end)` without its leading and trailing whitespace; None if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def words(text: str) -> list[Span]:
    """Runs of non-whitespace characters (punctuation stays with its word)."""
    return [m.span() for m in re.finditer(r"\S+", text)]


_SENTENCE_END = re.compile(r"[.!?\u3002]+[\"')\]\u201d\u2019]*(?=\s|$)|\n\s*\n|\n")


def sentences(text: str) -> list[Span]:
    """Sentences: a run of text ending at `.`, `!`, `?` (with closing quotes or brackets) before
    whitespace, or at a line break; surrounding whitespace left out."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end() if not m.group().isspace() else m.start()
        if (span := _stripped(text, start, end)) is not None:
            spans.append(span)
        start = m.end()
    if (span := _stripped(text, start, len(text))) is not None:
        spans.append(span)
    return spans


def lines(text: str) -> list[Span]:
    """Non-empty lines, without their surrounding whitespace."""
    spans, start = [], 0
    for line in text.split("\n"):
        if (span := _stripped(text, start, start + len(line))) is not None:
            spans.append(span)
        start += len(line) + 1
    return spans


def documents(separator: str = "\n\n") -> Splitter:
    """A splitter into the parts of a text between `separator`s (retrieved passages), without
    their surrounding whitespace.

    >>> prepare(model, tok, prompt, groups=documents("\\n\\n"))
    """
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"`separator`={separator!r}: pass a non-empty string, e.g. '\\n\\n'.")

    def split(text: str) -> list[Span]:
        spans, start = [], 0
        for part in text.split(separator):
            if (span := _stripped(text, start, start + len(part))) is not None:
                spans.append(span)
            start += len(part) + len(separator)
        return spans

    split.__name__ = "documents"
    split.separator = separator  # type: ignore[attr-defined]
    return split


def messages(text: str) -> list[Span]:
    """The turns of a chat prompt (`prepare(..., chat=True)`): the system message's content and
    the user's, one group each. It needs the rendered prompt, so `prepare` handles it; called
    on a plain text it is the whole text as one turn."""
    return [s] if (s := _stripped(text, 0, len(text))) is not None else []


SPLITTERS: dict[str, Splitter] = {
    "words": words,
    "sentences": sentences,
    "lines": lines,
    "messages": messages,
    "documents": documents(),
}


def splitter(by: str | Splitter) -> Splitter:
    """A splitter from its name (`SPLITTERS`) or a callable."""
    if callable(by):
        return by
    if by not in SPLITTERS:
        raise ValueError(f"groups {by!r} is unknown: use one of {sorted(SPLITTERS)}, "
                         "`fnattr.groups.documents(separator)`, a function text -> [(start, end)], "
                         "or character spans per row.")
    return SPLITTERS[by]


def kind(by: Any) -> str:
    """The name recorded for a grouping: a splitter's name, or "spans"."""
    return getattr(by, "__name__", "spans") if callable(by) else by if isinstance(by, str) else "spans"


# ---- tokens -> groups ------------------------------------------------------------------------

def _offsets(tokenizer, ids: list[int], text: str) -> list[Span]:
    """Character offsets in `text` of each token of `ids` (the tokenizer's encoding of `text`,
    with or without its added special tokens); special tokens get empty spans."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("groups need a fast tokenizer (its character offsets place tokens in "
                         "groups): load the tokenizer with use_fast=True.")
    for special in (True, False):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [tuple(o) for o in enc["offset_mapping"]]
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inner = list(plain["input_ids"])
    for start in range(len(ids) - len(inner) + 1):  # the text's tokens among added ones
        if ids[start:start + len(inner)] == inner:
            out = [(0, 0)] * len(ids)
            out[start:start + len(inner)] = [tuple(o) for o in plain["offset_mapping"]]
            return out
    raise ValueError("groups: the source's tokens are not the tokenizer's encoding of its text, "
                     "so they cannot be placed in groups: prepare the batch with this tokenizer.")


def _assign(offsets: Sequence[Span], spans: Sequence[Span], text: str, *, strict: bool,
            row: int) -> tuple[list[int], list[str]]:
    """Group index of each token (-1: none) and each group's text (its tokens' characters,
    without surrounding whitespace)."""
    owner = [-1] * len(offsets)
    for t, (a, b) in enumerate(offsets):
        if b > a:
            owner[t] = next((g for g, (s, e) in enumerate(spans) if a < e and s < b), -1)
    used = sorted(set(owner) - {-1})
    if strict and len(used) != len(spans):
        lost = next(g for g in range(len(spans)) if g not in used)
        raise ValueError(f"`groups` span {tuple(spans[lost])} of row {row} holds no token of its own "
                         "(it lies inside a token that an earlier span took): widen or merge it.")
    renumber = {g: i for i, g in enumerate(used)}
    owner = [renumber.get(g, -1) for g in owner]
    texts = []
    for g in range(len(used)):
        members = [offsets[t] for t, o in enumerate(owner) if o == g]
        texts.append(text[min(a for a, _ in members):max(b for _, b in members)].strip())
    return owner, texts


def split_tokens(tokens: Sequence[str], positions: Sequence[int], by: str | Splitter,
                 row: int = 0) -> list[list[int]]:
    """`positions` (indices into `tokens`, in order) grouped by the spans that splitter `by` finds
    in their concatenated texts: one list per span, spans in text order (generated sentences)."""
    offsets, text = [], ""
    for j in positions:
        offsets.append((len(text), len(text) + len(tokens[j])))
        text += tokens[j]
    owner, _ = _assign(offsets, splitter(by)(text), text, strict=False, row=row)
    n = max(owner + [-1]) + 1
    return [[positions[i] for i, o in enumerate(owner) if o == s] for s in range(n)]


def _check_spans(spans: Any, text: str, row: int) -> list[Span]:
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError(f"`groups[{row}]` is {type(spans).__name__}: give a list of (start, end) "
                        "character spans per row.")
    out = []
    for s in spans:
        if (not isinstance(s, Sequence) or len(s) != 2 or not all(isinstance(x, int) for x in s)
                or not 0 <= s[0] < s[1] <= len(text)):
            raise ValueError(f"`groups[{row}]` has span {s!r}: spans are (start, end) with 0 <= "
                             f"start < end <= {len(text)}, the length of `sources[{row}]`.")
        out.append((int(s[0]), int(s[1])))
    for (s0, e0), (s1, e1) in zip(sorted(out), sorted(out)[1:]):
        if s1 < e0:
            raise ValueError(f"`groups[{row}]` spans {(s0, e0)} and {(s1, e1)} overlap: a token "
                             "belongs to one group; make the spans disjoint.")
    return out


def _chat_spans(render: Callable, tokenizer, text: str, system: str | None, by: Splitter | None,
                spans: list[Span] | None, row: int) -> tuple[str, list[Span]]:
    """The rendered chat prompt and the groups' spans in it."""
    prompt, start, end = render(tokenizer, text, system, row)
    if by is messages:
        turns = []
        at = prompt.rfind(system, 0, start) if system else -1
        if at >= 0 and (s := _stripped(prompt, at, at + len(system))) is not None:
            turns.append(s)
        if (s := _stripped(prompt, start, end)) is not None:
            turns.append(s)
        return prompt, turns
    user = prompt[start:end]
    found = by(user) if spans is None else spans
    return prompt, [(start + a, start + b) for a, b in found]


def attach(batch, tokenizer, groups: str | Splitter | Sequence, *, system: str | None = None,
           render: Callable | None = None):
    """`batch` with `source_groups` (token -> group, -1 for none), `source_group_texts` and
    `group_by` set from `groups`: a splitter (name in `SPLITTERS` or a function text -> spans)
    or character spans per row (in `batch.sources[i]`). `system`: the system message the chat
    prompt was rendered with (`prepare(chat=True, system=...)`)."""
    chat = batch.source_template is not None
    by = None if not callable(groups) and not isinstance(groups, str) else splitter(groups)
    if by is None:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) != len(batch):
            n = len(groups) if isinstance(groups, Sequence) else type(groups).__name__
            raise ValueError(f"`groups` has {n} rows for {len(batch)} sources: give one list of "
                             "(start, end) spans per source, or a splitter such as 'sentences'.")
    if by is messages and not chat:
        raise ValueError("groups='messages' splits a chat prompt into its turns: prepare with "
                         "chat=True (and `system=` for a system turn).")
    owners = torch.full(batch.source_ids.shape, -1, dtype=torch.long)
    texts = []
    for b, source in enumerate(batch.sources):
        spans = None if by is not None else _check_spans(groups[b], source, b)
        cols = batch.source_mask[b].nonzero().squeeze(1)
        ids = batch.source_ids[b, cols].tolist()
        if chat:
            text, spans = _chat_spans(render, tokenizer, source, system, by, spans, b)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(enc["input_ids"]) != ids:
                raise ValueError(f"groups: row {b}'s tokens are not its chat prompt's: prepare the "
                                 "batch with this tokenizer and `system`.")
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        else:
            text, spans = source, by(source) if spans is None else spans
            offsets = _offsets(tokenizer, ids, source)
        owner, row_texts = _assign(offsets, spans, text, strict=by is None, row=b)
        owners[b, cols] = torch.tensor(owner, dtype=torch.long)
        texts.append(tuple(row_texts))
    return dataclasses.replace(batch, source_groups=owners.to(batch.source_ids.device),
                               source_group_texts=tuple(texts), group_by=kind(groups))


def ungrouped(batch):
    """`batch` without its groups: methods attribute (and perturb) single tokens again."""
    return dataclasses.replace(batch, source_groups=None, source_group_texts=None, group_by=None)


# ---- results -> groups -----------------------------------------------------------------------

def _post_hoc(out, by: str | Splitter):
    """Groups of `out`'s source tokens from their joined texts (no tokenizer at hand)."""
    split = splitter(by)
    owners = torch.full(out.source_ids.shape, -1, dtype=torch.long)
    texts = []
    for b, tokens in enumerate(out.source_tokens):
        cols = out.source_mask[b].nonzero().squeeze(1).tolist()
        offsets, text, at = [], "", 0
        for c in cols:
            offsets.append((at, at + len(tokens[c])))
            text += tokens[c]
            at += len(tokens[c])
        owner, row_texts = _assign(offsets, split(text), text, strict=False, row=b)
        if cols:
            owners[b, cols] = torch.tensor(owner, dtype=torch.long)
        texts.append(tuple(row_texts))
    return owners, tuple(texts)


def group_reduction(out, reduction: Any = None) -> str:
    """How token scores combine into a group's: "l2" (the L2 norm over the group's tokens) where
    the token scores are norms (the hidden dims reduce by "l2", e.g. saliency), else "sum"."""
    how = aggregate.default_reduction(out) if reduction is None else reduction
    if reduction is None and not out.extra_dims:  # reduced before: by the reduction recorded
        done = [name for name, _ in aggregate.aggregations(out) if name in ("l2", "sum", "mean", "max")]
        how = done[-1] if done else how
    return "l2" if how == "l2" else "sum"


def grouped(out, by: str | Splitter | None = None, *, reduction: Any = None):
    """`out` with one score per source group: the source axis is the groups (source_tokens are
    their texts), the target side unchanged.

    The `*extra` dims reduce first (`reduction`, default the method's own:
    `fnattr.views.default_reduction`), then a group's score is the sum of its tokens' scores, or
    their L2 norm where the token scores are norms (gradient magnitudes). Tokens in no group are
    left out. `by`: the result's own groups (`prepare(groups=...)`) by default, or a splitter
    applied to the joined token texts. A result already grouped is returned as it is.
    """

    if out.meta.get("grouped"):
        if by is not None and kind(by) != out.meta.get("group_by"):
            raise ValueError(f"the result is already grouped by {out.meta.get('group_by')!r}: "
                             f"it cannot be regrouped by {kind(by)!r}; attribute again.")
        return out
    if by is not None and out.source_groups is not None and kind(by) == out.meta.get("group_by"):
        by = None  # the result's own groups, placed by the tokenizer's offsets
    if by is None:
        if out.source_groups is None:
            raise ValueError("the result has no groups: prepare the batch with `groups=` (e.g. "
                             "'sentences'), or pass `by=` a splitter name such as 'sentences'.")
        owners, texts, name = out.source_groups, out.group_texts, out.meta.get("group_by", "spans")
    else:
        (owners, texts), name = _post_hoc(out, by), kind(by)
    how = group_reduction(out, reduction)
    tokens = aggregate.reduce(out, aggregate.default_reduction(out) if reduction is None else reduction)
    n = max([len(t) for t in texts] + [1])
    onehot = torch.nn.functional.one_hot(owners.clamp(min=0), n).to(tokens.source) \
        * (owners >= 0)[..., None].to(tokens.source)  # [batch src group]
    if how == "l2":
        scores = torch.einsum("bks,bsg->bkg", tokens.source.square(), onehot).sqrt()
    else:
        scores = torch.einsum("bks,bsg->bkg", tokens.source, onehot)
    return as_groups(tokens, scores, owners, texts, name, how)


def as_groups(out, scores: Tensor, owners: Tensor, texts: tuple[tuple[str, ...], ...],
              name: str, how: str):
    """`out` (extra dims reduced) with source axis `scores` [batch step group]."""
    return out.replace(**group_fields(out, scores, owners, texts, name, how))


def group_fields(out, scores: Tensor, owners: Tensor, texts: tuple[tuple[str, ...], ...],
                 name: str, how: str) -> dict[str, Any]:
    """The fields of `out` that change when its source axis becomes the groups (`scores`
    [batch step group], `owners` [batch src] from token to group, `texts` per row)."""
    n = scores.shape[2]
    ids = torch.zeros(len(texts), n, dtype=out.source_ids.dtype)
    mask = torch.zeros(len(texts), n, dtype=torch.bool)
    for b, row in enumerate(texts):
        mask[b, :len(row)] = True
        for g in range(len(row)):
            ids[b, g] = out.source_ids[b][owners[b] == g][0]
    labels = tuple(tuple(row) + ("",) * (n - len(row)) for row in texts)
    steps = json.loads(out.meta.get("aggregations", "[]")) + [["grouped", [name, how]]]
    meta = {**out.meta, "aggregations": json.dumps(steps), "grouped": how, "group_by": name}
    scores = scores * mask[:, None, :].to(scores)
    return dict(source=scores, source_ids=ids, source_mask=mask, source_tokens=labels,
                source_groups=None, group_texts=None, meta=meta)

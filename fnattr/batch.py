"""Batch of tokenized sources and targets, and `prepare` to build one (generated or forced)."""

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fnattr import defaults
from fnattr._check import typechecked
from fnattr.hooks.attention import eager_experts, finite_masks
from fnattr.hooks.frozen import frozen
from fnattr.types import Model


@typechecked
@dataclasses.dataclass(frozen=True)
class Batch:
    """Sources and targets of a batch, padded, with masks.

    Decoder-only models: `source` is the prompt (left padded), `target` the continuation (right
    padded); step t predicts `target_ids[:, t]` from the prompt and `target_ids[:, :t]`.
    Encoder-decoder models: `source` is the encoder input, `target` the decoder output without the
    decoder start token, which `decoder_start_id` holds.
    """

    source_ids: Int[Tensor, "batch src"]
    source_mask: Bool[Tensor, "batch src"]
    source_special: Bool[Tensor, "batch src"]
    target_ids: Int[Tensor, "batch tgt"]
    target_mask: Bool[Tensor, "batch tgt"]
    target_special: Bool[Tensor, "batch tgt"]
    source_tokens: tuple[tuple[str, ...], ...]
    target_tokens: tuple[tuple[str, ...], ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    is_encoder_decoder: bool
    pad_id: int
    unk_id: int | None = None
    decoder_start_id: int | None = None
    # (role, id, text) of every special token of the tokenizer and model configs (`prepare()`)
    special_tokens: tuple[tuple[str, int, str], ...] = ()
    # `prepare(chat=True)`: the source tokens the chat template wrote (role headers, markers, its
    # newlines, a system turn), everything but the user's text; None without chat. Unless
    # `keep_template=True` they are in `source_special` too, so methods leave them unattributed.
    source_template: Bool[Tensor, "batch src"] | None = None
    # `prepare(groups=...)` (`fnattr.groups`): the group of each source token (-1: none; indices
    # per row), each row's group texts, and the grouping's name ("sentences", "spans", ...)
    source_groups: Int[Tensor, "batch src"] | None = None
    source_group_texts: tuple[tuple[str, ...], ...] | None = None
    group_by: str | None = None

    def __len__(self) -> int:
        return self.source_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})

    def select(self, rows: Sequence[int]) -> "Batch":
        """The sub-batch of `rows`, with padding columns that no kept row uses dropped."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.source_ids.device)
        return self._take(list(rows), *self.used_columns(idx))

    def used_columns(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The source and target columns that a real token of `rows` (default all) uses; the
        target's run from column 0 to the last one used (at least one column)."""
        rows = slice(None) if rows is None else rows
        src_keep, tgt_keep = self.source_mask[rows].any(0), self.target_mask[rows].any(0)
        n_tgt = int(tgt_keep.nonzero().max()) + 1 if tgt_keep.any() else 1
        return src_keep.nonzero().squeeze(1), torch.arange(n_tgt, device=tgt_keep.device)

    def columns(self, source: Tensor, target: Tensor) -> "Batch":
        """Every row, at the source and target columns given (e.g. by `used_columns`)."""
        return self._take(range(len(self)), source, target)

    def _take(self, rows: Sequence[int], src_cols: Tensor, tgt_cols: Tensor) -> "Batch":
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.source_ids.device)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for side, cols in (("source", src_cols), ("target", tgt_cols)):
            for key in ("ids", "mask", "special", "template", "groups"):
                if fields.get(f"{side}_{key}") is not None:
                    fields[f"{side}_{key}"] = fields[f"{side}_{key}"][idx][:, cols.to(idx.device)]
            fields[f"{side}_tokens"] = tuple(
                tuple(fields[f"{side}_tokens"][r][c] for c in cols.tolist()) for r in rows
            )
            fields[f"{side}s"] = tuple(fields[f"{side}s"][r] for r in rows)
        if fields["source_group_texts"] is not None:
            fields["source_group_texts"] = tuple(fields["source_group_texts"][r] for r in rows)
        return Batch(**fields)


def _as_texts(texts: str | Sequence[str], name: str) -> tuple[str, ...]:
    if not isinstance(texts, str) and (isinstance(texts, (Mapping, Set, bytes, bytearray))
                                       or not isinstance(texts, Iterable)):
        raise TypeError(f"`{name}` is {type(texts).__name__}: pass a text (str) or a list of texts.")
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if not texts:
        raise ValueError(f"`{name}` is empty: pass at least one text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`{name}[{i}]` is {type(text).__name__}, not str: pass texts.")
        if not text.strip():
            raise ValueError(f"`{name}[{i}]` is an empty text: pass a non-empty string.")
    return texts


def _pad_id(tokenizer: PreTrainedTokenizerBase, model: Model) -> int:
    for candidate in (tokenizer.pad_token_id, model.config.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: Model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if isinstance(i, int)}


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], name: str, *, mode: str
) -> list[list[int]]:
    """`mode`: "source" (with special tokens), "continuation" (without), "decoder" (text_target)."""
    if mode == "decoder":
        rows = [list(tokenizer(text_target=text)["input_ids"]) for text in texts]
    else:
        special = mode == "source"
        rows = [list(tokenizer(text, add_special_tokens=special)["input_ids"]) for text in texts]
    for i, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"`{name}[{i}]` gives no tokens: pass a text the tokenizer can encode.")
    return rows


def _pad(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.as_tensor(row, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask


def _cut_at_eos(rows: Tensor, eos_ids: set[int]) -> list[list[int]]:
    """Generated rows up to and including the first EOS (later tokens are padding)."""
    out = []
    for row in rows.tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), len(row))
        out.append(row[:end])
    return out


def _tokens(tokenizer: PreTrainedTokenizerBase, ids: Tensor) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(tokenizer.decode([i]) for i in row) for row in ids.tolist())


def _special(tokenizer: PreTrainedTokenizerBase, ids: Tensor, mask: Tensor) -> Tensor:
    specials = torch.as_tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    return torch.isin(ids, specials) | ~mask


def _special_tokens(tokenizer: PreTrainedTokenizerBase, model: Model) -> tuple[tuple[str, int, str], ...]:
    """(role, id, text) of the special tokens, for `fnattr.baselines` to tell separators apart.

    Roles: the tokenizer's bos, eos, unk, sep, pad, cls and mask; "extra" (its extra or additional
    special tokens); "chat" (an added token written literally by the chat template); "added"
    (another added special token); the model configs' bos, eos, pad and decoder_start ids."""
    found: dict[tuple[str, int], None] = {}
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        found[(role, getattr(tokenizer, f"{role}_token_id", None))] = None
    extra = (getattr(tokenizer, "extra_special_tokens", None)
             or getattr(tokenizer, "additional_special_tokens", None) or ())
    for text in map(str, extra.values() if isinstance(extra, dict) else extra):
        i = tokenizer.convert_tokens_to_ids(text)
        if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == text:  # not the unk id
            found[("extra", i)] = None
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    named = {i for _, i in found}
    for i, added in tokenizer.added_tokens_decoder.items():
        if added.content in template:
            found[("chat", i)] = None
        elif added.special and i not in named:
            found[("added", i)] = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for role in ("bos", "eos", "pad", "decoder_start"):
            ids = getattr(cfg, f"{role}_token_id", None)
            for i in ids if isinstance(ids, list) else [ids]:
                found[(role, i)] = None
    ids = sorted((i, role) for role, i in found if isinstance(i, int) and i >= 0)
    texts = [tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None for i, _ in ids]
    return tuple((role, i, text if isinstance(text, str) else "") for (i, role), text in zip(ids, texts))


def _generate_after(
    model: Model, src_rows: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]],
    start_id: int | None, pad_id: int, eos: set[int], max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> list[list[int]]:
    """Each forced target prefix followed by what the model generates after it, row by row
    (prefixes differ in length, and a decoder cannot be left padded)."""
    kwargs = {"do_sample": False, "pad_token_id": pad_id, **generate_kwargs}
    out = []
    for src, prefix in zip(src_rows, prefixes):
        if model.config.is_encoder_decoder:
            inputs = {"input_ids": torch.tensor([list(src)]),
                      "decoder_input_ids": torch.tensor([[start_id, *prefix]])}
        else:
            inputs = {"input_ids": torch.tensor([[*src, *prefix]])}
        cut = inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        with torch.no_grad(), frozen(model), finite_masks(model), eager_experts(model):  # eval mode
            new = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs).cpu()[:, cut:]
        out.append(list(prefix) + _cut_at_eos(new, eos)[0])
    return out


def _prefixes(rows: list[list[int]], eos: set[int], enc_dec: bool) -> list[list[int]]:
    """Forced target prefixes to continue: an encoder-decoder target's closing EOS removed."""
    return [row[:-1] if enc_dec and len(row) > 1 and row[-1] in eos else row for row in rows]


def _source_specials(
    tokenizer: PreTrainedTokenizerBase, model: Model, ids: Tensor, mask: Tensor,
    include_eos_baseline: bool,
) -> Tensor:
    """`Batch.source_special`; with `include_eos_baseline` an EOS in the source is an ordinary
    token (replaced by the baseline, perturbed and attributed like the others)."""
    special = _special(tokenizer, ids, mask)
    if include_eos_baseline:
        eos = torch.as_tensor(sorted(_eos_ids(tokenizer, model)), dtype=torch.long)
        special = special & ~(torch.isin(ids, eos) & mask)
    return special


def _drop_added_specials(
    tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], rows: list[list[int]]
) -> list[list[int]]:
    """The sources without the special tokens the tokenizer adds (BOS, CLS, ...), except a
    closing EOS, which encoders are trained to read; special tokens written in the text stay."""
    plain = _tokenize(tokenizer, sources, "sources", mode="continuation")
    eos = tokenizer.eos_token_id
    return [p + [eos] if full and full[-1] == eos and (not p or p[-1] != eos) else p
            for p, full in zip(plain, rows)]


def _generate(
    model: Model, src_ids: Tensor, src_mask: Tensor, pad_id: int, eos: set[int],
    max_new_tokens: int, generate_kwargs: dict[str, Any],
) -> list[list[int]]:
    kwargs = {"do_sample": False, "pad_token_id": pad_id, **generate_kwargs}
    device = model.device
    # eval mode (no dropout); float64: masks finite on padded rows, experts without grouped_mm; restored
    with torch.no_grad(), frozen(model), finite_masks(model), eager_experts(model):
        out = model.generate(
            input_ids=src_ids.to(device), attention_mask=src_mask.to(device).long(),
            max_new_tokens=max_new_tokens, **kwargs,
        ).cpu()
    new = out[:, 1:] if model.config.is_encoder_decoder else out[:, src_ids.shape[1]:]
    return _cut_at_eos(new, eos)


def _decoder_start_id(model: Model) -> int | None:
    if not model.config.is_encoder_decoder:
        return None
    for cfg in (model.generation_config, model.config):
        start = getattr(cfg, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    raise ValueError("neither the model's generation config nor its config has a `decoder_start_token_id`: "
                     "set it on model.generation_config.")


_MARK = "\ue000fnattr\ue000"  # private-use characters: a stand-in for the user's text


def _render(
    tokenizer: PreTrainedTokenizerBase, text: str, system: str | None, i: int
) -> tuple[str, int, int]:
    """The chat prompt of `text` as the user's turn, and where the user's text lies in it."""
    # here, not at the top: transformers' chat templates need jinja2, base models do not
    from jinja2 import TemplateError

    def render(content: str) -> str:
        messages = [{"role": "system", "content": system}] if system is not None else []
        try:
            return tokenizer.apply_chat_template(messages + [{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # e.g. raise_exception("System role not supported")
            raise ValueError(f"`chat=True`: the tokenizer's chat template failed on `sources[{i}]`"
                             f"{' with `system`' if system is not None else ''}: {err}") from None

    prompt, parts = render(text), render(_MARK).split(_MARK)
    if len(parts) == 2:
        for shown in (text, text.strip()):  # templates may `| trim` the content
            if prompt == parts[0] + shown + parts[1]:
                return prompt, len(parts[0]), len(parts[0]) + len(shown)
    raise ValueError(f"`chat=True`: the chat template rewrites `sources[{i}]`, so its tokens cannot "
                     "be told from the template's: render the prompt yourself and pass chat=False.")


def _chat_rows(
    tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], system: str | None
) -> tuple[list[list[int]], list[list[bool]]]:
    """Each source as the user's turn of the chat template (after a `system` turn if given), with
    the assistant's turn opened, and which tokens the template wrote (outside the user's text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("`chat=True` but the tokenizer has no chat template (a base model?): pass "
                         "chat=False, or set `tokenizer.chat_template` to the model's Jinja template.")
    if not tokenizer.is_fast:
        raise ValueError("`chat=True` needs a fast tokenizer (its character offsets locate the user's "
                         "text): load the tokenizer with use_fast=True.")
    rows, template = [], []
    for i, text in enumerate(sources):
        prompt, start, end = _render(tokenizer, text, system, i)
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        rows.append(list(enc["input_ids"]))
        template.append([b <= start or a >= end for a, b in enc["offset_mapping"]])
    return rows, template


def _limit(cfg: Any, names: Sequence[str]) -> tuple[int, str] | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value, f"config.{name}"
    return None


def _context(model: Model) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """(positions, config field) for the source side and for prompt + target (decoder-only) or
    the decoder (encoder-decoder); None where the config sets no limit (e.g. T5)."""
    cfg = model.config
    if cfg.is_encoder_decoder:
        return (_limit(cfg, ("max_source_positions", "max_position_embeddings", "n_positions")),
                _limit(cfg, ("max_target_positions", "max_position_embeddings", "n_positions")))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = _limit(text, ("n_positions", "n_ctx", "max_position_embeddings"))
    return limit, limit


def _check_sources(
    model: Model, src_rows: Sequence[Sequence[int]], *, generating: bool, chat: bool
) -> None:
    """A prompt that the model's positions cannot hold (with one target token, decoder-only)."""
    limit = _context(model)[0]
    room = 1 if generating and not model.config.is_encoder_decoder else 0
    within = " in its chat template" if chat else ""
    for i, row in enumerate(src_rows):
        if limit is not None and len(row) + room > limit[0]:
            raise ValueError(f"`sources[{i}]` is {len(row)} tokens{within} but the model reads at most "
                             f"{limit[0]} positions ({limit[1]}){' with the target' if room else ''}:"
                             f" shorten it to {limit[0] - room} tokens.")


def _check_targets(
    model: Model, src_rows: Sequence[Sequence[int]], tgt_rows: Sequence[Sequence[int]]
) -> None:
    """A forced target that does not fit after its prompt (or after the decoder start token)."""
    enc_dec = bool(model.config.is_encoder_decoder)
    limit = _context(model)[1]
    for i, (src, tgt) in enumerate(zip(src_rows, tgt_rows)):
        used = 1 + len(tgt) if enc_dec else len(src) + len(tgt)
        if limit is not None and used > limit[0]:
            what = "the decoder start token" if enc_dec else f"`sources[{i}]` ({len(src)} tokens)"
            raise ValueError(f"`targets[{i}]` is {len(tgt)} tokens; with {what} that is {used}, but the "
                             f"model reads at most {limit[0]} positions ({limit[1]}): shorten it.")


def _cap_new_tokens(model: Model, src_rows: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """`max_new_tokens`, capped (with one warning) so generation stops at the context length."""
    limit = _context(model)[1]
    if limit is None:
        return max_new_tokens
    enc_dec = bool(model.config.is_encoder_decoder)
    longest = 1 if enc_dec else max(len(r) for r in src_rows)
    room = limit[0] - longest
    if max_new_tokens > room:
        after = "the decoder start token" if enc_dec else f"a {longest}-token prompt"
        warnings.warn(f"`max_new_tokens`={max_new_tokens} does not fit the model's context of {limit[0]} "
                      f"positions ({limit[1]}): after {after} generation stops at {room} new tokens.",
                      UserWarning, stacklevel=3)
    return min(max_new_tokens, room)


def _source_rows(
    tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], *, chat: bool, keep_template: bool,
    system: str | None, skip_special_tokens: bool = False,
) -> tuple[list[list[int]], list[list[bool]] | None]:
    if not chat:
        if system is not None or keep_template:
            raise ValueError("`system` and `keep_template` apply to chat prompts: pass chat=True.")
        rows = _tokenize(tokenizer, sources, "sources", mode="source")
        return (_drop_added_specials(tokenizer, sources, rows) if skip_special_tokens else rows), None
    if skip_special_tokens:
        raise ValueError("`skip_special_tokens=True` removes the tokenizer's added tokens, but a chat "
                         "prompt's come from its template: pass keep_template=False (the default) "
                         "to leave the template's tokens unattributed instead.")
    return _chat_rows(tokenizer, sources, system)


def prepare(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    sources: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    *,
    chat: bool = False,
    keep_template: bool = False,
    system: str | None = None,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    skip_special_tokens: bool = False,
    include_eos_baseline: bool = False,
    generate_from_target_prefix: bool = False,
    groups: Any = None,
    **generate_kwargs: Any,
) -> Batch:
    """Tokenize `sources` and either force `targets` or generate them (greedy unless told).

    Targets are the continuation only: a forced target is never required to repeat the source.
    Extra keyword arguments go to `model.generate` (e.g. `do_sample=True, top_p=0.9`). The model
    generates in eval mode (no dropout: greedy means greedy), and gets its modes back after.

    `chat=True` (instruct models) renders each source as the user's message, after a `system`
    message if given, with the tokenizer's chat template and the assistant's turn opened; a forced
    target is the assistant's reply. The tokens the template writes are recorded in
    `source_template` and, unless `keep_template=True`, marked special: methods keep them at their
    input value and do not attribute them. `Batch.sources` stays the user's text.

    A prompt (with its forced target) longer than the model's positions (`n_positions`, `n_ctx`,
    `max_position_embeddings`, ...) is refused; a `max_new_tokens` past them is capped, with a
    warning, so generation stops at the context length.

    Options an inseq user knows (defaults differ on purpose where noted):
    - `skip_special_tokens=True`: the source without the special tokens the tokenizer adds
      (BOS, ...), except a closing EOS. The default keeps them in the input, where they are
      special: held at their value (never perturbed), so perturbation methods score them 0.
    - `include_eos_baseline=True`: an EOS in the source is an ordinary token, replaced by the
      baseline and attributed; by default it is special, as inseq's default.
    - `generate_from_target_prefix=True`: `targets` are prefixes that the model continues (up
      to `max_new_tokens` more, greedy unless told); the target is prefix + continuation.

    `groups` (`fnattr.groups`): feature groups of the source tokens, a splitter ("words",
    "sentences", "lines", "messages", "documents", `fnattr.groups.documents(separator)`, a
    function text -> [(start, end)]) or character spans per source; recorded in
    `source_groups` (token -> group, -1 for tokens in no group: BOS, template tokens).

    >>> batch = prepare(model, tokenizer, ["The capital of France is"], max_new_tokens=4)
    >>> batch.target_tokens  # ((" Paris", ".", ...),)
    >>> prepare(model, tokenizer, ["Write a story about a cat."], chat=True)  # an instruct model
    """
    sources = _as_texts(sources, "sources")
    if targets is not None:
        targets = _as_texts(targets, "targets")
        if len(targets) != len(sources):
            raise ValueError(
                f"`targets` has {len(targets)} texts but `sources` has {len(sources)}: "
                "give exactly one target per source."
            )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` is {max_new_tokens}: it must be at least 1.")
    if isinstance(groups, str):  # a splitter's name, checked before anything is generated
        from fnattr.groups import splitter

        splitter(groups)
    if generate_from_target_prefix and targets is None:
        raise ValueError("`generate_from_target_prefix=True` continues the given `targets`: pass "
                         "the target prefixes, or leave it False to generate from the source.")
    enc_dec = bool(model.config.is_encoder_decoder)
    pad_id = _pad_id(tokenizer, model)
    src_rows, template_rows = _source_rows(tokenizer, sources, chat=chat,
                                           keep_template=keep_template, system=system,
                                           skip_special_tokens=skip_special_tokens)
    _check_sources(model, src_rows, generating=targets is None, chat=chat)
    src_ids, src_mask = _pad(src_rows, pad_id, left=not enc_dec)
    if targets is None:
        eos = _eos_ids(tokenizer, model)
        max_new_tokens = _cap_new_tokens(model, src_rows, max_new_tokens)
        tgt_rows = _generate(model, src_ids, src_mask, pad_id, eos, max_new_tokens, generate_kwargs)
    else:
        tgt_rows = _tokenize(tokenizer, targets, "targets", mode="decoder" if enc_dec else "continuation")
        _check_targets(model, src_rows, tgt_rows)
        if generate_from_target_prefix:
            eos = _eos_ids(tokenizer, model)
            prefixes = _prefixes(tgt_rows, eos, enc_dec)
            room = _cap_new_tokens(model, [s + p for s, p in zip(src_rows, prefixes)], max_new_tokens)
            if enc_dec and (limit := _context(model)[1]) is not None:  # after start + prefix
                room = min(room, limit[0] - 1 - max(len(p) for p in prefixes))
            tgt_rows = (_generate_after(model, src_rows, prefixes, _decoder_start_id(model), pad_id,
                                        eos, room, generate_kwargs) if room > 0 else prefixes)
    for i, row in enumerate(tgt_rows):
        if not row:
            raise ValueError(f"generation for `sources[{i}]` produced no token: raise max_new_tokens.")
    tgt_ids, tgt_mask = _pad(tgt_rows, pad_id, left=False)
    src_special = _source_specials(tokenizer, model, src_ids, src_mask, include_eos_baseline)
    template = None
    if template_rows is not None:
        template = _pad([[int(t) for t in row] for row in template_rows], 0, left=not enc_dec)[0].bool()
        src_special = src_special if keep_template else src_special | template
    unk = tokenizer.unk_token_id
    batch = Batch(
        source_ids=src_ids, source_mask=src_mask, source_special=src_special,
        target_ids=tgt_ids, target_mask=tgt_mask, target_special=_special(tokenizer, tgt_ids, tgt_mask),
        source_tokens=_tokens(tokenizer, src_ids), target_tokens=_tokens(tokenizer, tgt_ids),
        sources=sources,
        targets=tuple(tokenizer.decode(row, skip_special_tokens=True) for row in tgt_rows),
        is_encoder_decoder=enc_dec, pad_id=pad_id, unk_id=unk if isinstance(unk, int) else None,
        decoder_start_id=_decoder_start_id(model), special_tokens=_special_tokens(tokenizer, model),
        source_template=template,
    )
    if groups is None:
        return batch
    from fnattr.groups import attach

    return attach(batch, tokenizer, groups, system=system, render=_render)

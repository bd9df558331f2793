"""ReAGent's part-of-speech-aware replacements, on a tag function the user supplies.

`pos_tags(tokenizer, tag_fn)` tags the vocabulary once; `pos_proposals` turns a batch's tokens
into replacement distributions over the vocabulary tokens of the same tag. fnattr ships no
tagger (NLTK's needs a data download, spaCy's models are large): any callable from token
strings to tags works.
"""

import dataclasses
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fnattr.attribution import Context

TagFn = Callable[[Sequence[str]], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class PosTags:
    """A part-of-speech tagger for ReAGent's POS-aware replacements (`pos_tags(...)` builds it):
    `tag_fn` tags a sequence of token strings, `vocab` holds the tag of every vocabulary id
    (each token tagged alone), `names` the tag names."""

    tag_fn: TagFn
    vocab: Tensor  # [vocab] index into names
    names: tuple[str, ...]

    def to_meta(self) -> list[str]:
        """What a result's `meta["args"]` records of it: the tag names."""
        return list(self.names)


def pos_tags(tokenizer: PreTrainedTokenizerBase, tag_fn: TagFn) -> PosTags:
    """Tag the vocabulary once with `tag_fn` (a function from token strings to one tag each, e.g.
    a wrapper around an offline tagger you trust), for `reagent(..., pos_tags=...)`.

    fnattr ships no tagger: NLTK's needs a data download and spaCy's models are large; any
    callable works. Each vocabulary token is tagged alone (`tag_fn([token])`, V calls, once).

    >>> tags = pos_tags(tok, lambda words: ["NUM" if w.strip().isdigit() else "X" for w in words])
    >>> out = reagent(model, batch, pos_tags=tags)
    """
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    tags = [_one_tag(tag_fn, [t], 1)[0] for t in texts]
    names = tuple(sorted(set(tags)))
    index = {name: i for i, name in enumerate(names)}
    return PosTags(tag_fn, torch.tensor([index[t] for t in tags]), names)


def _one_tag(tag_fn: TagFn, words: list[str], n: int) -> list[str]:
    tags = list(tag_fn(words))
    if len(tags) != n or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"`pos_tags`' tag_fn returned {tags!r} for {n} tokens {words!r}: return one "
                         "str tag per token.")
    return tags


def pos_proposals(ctx: Context, probs: Tensor, tags: PosTags) -> Float[Tensor, "batch seq vocab"]:
    """POS-aware replacements (ReAGent's POS sampler): at each position, uniform over the
    vocabulary tokens with the tag that `tags.tag_fn` gives the token in its sequence, the token
    itself and special tokens excluded; positions with no such token keep `probs`."""
    b = ctx.batch
    vocab = probs.shape[-1]
    ids = torch.cat([b.source_ids, b.target_ids], 1).cpu()
    real = torch.cat([b.source_mask, b.target_mask], 1).cpu()
    words = [s + t for s, t in zip(b.source_tokens, b.target_tokens)]
    index = {name: i for i, name in enumerate(tags.names)}
    at = torch.full(ids.shape, -1, dtype=torch.long)
    for r in range(len(b)):
        cols = real[r].nonzero().squeeze(1).tolist()
        found = _one_tag(tags.tag_fn, [words[r][c] for c in cols], len(cols))
        at[r, cols] = torch.tensor([index.get(t, -1) for t in found], dtype=torch.long)
    vocab_tags = tags.vocab[:vocab]
    if len(vocab_tags) < vocab:  # ids past the tokenizer (padded embedding rows): never proposed
        vocab_tags = torch.cat([vocab_tags, vocab_tags.new_full((vocab - len(vocab_tags),), -2)])
    specials = torch.tensor([i for _, i, _ in b.special_tokens if 0 <= i < vocab], dtype=torch.long)
    same = (vocab_tags[None, None, :] == at[..., None]) & (at[..., None] >= 0)
    same[..., specials] = False
    same.scatter_(-1, ids[..., None], False)
    count = same.sum(-1, keepdim=True)
    uniform = same.to(probs.dtype) / count.clamp(min=1)
    return torch.where(count.to(probs.device) > 0, uniform.to(probs.device), probs)

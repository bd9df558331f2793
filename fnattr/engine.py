"""The one-pass step engine: one teacher-forced forward serves every generated step.

Step t's logits come from the full sequence because of causal masking, so a method runs the
model once (per perturbation) and takes per-step gradients with one batched backward.
"""

import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fnattr._check import typechecked
from fnattr.batch import Batch
from fnattr.hooks.embedding import EmbeddingHandle
from fnattr.types import Logits, Model, TargetFn


@lru_cache(maxsize=64)
def _accepts(forward_cls: type, name: str) -> bool:
    return name in inspect.signature(forward_cls.forward).parameters


def step_range(batch: Batch, attr_pos_start: int | None, attr_pos_end: int | None) -> Tensor:
    """Target positions to attribute: `[attr_pos_start, attr_pos_end)`, Python-style negatives."""
    n = batch.target_ids.shape[1]
    start, end, _ = slice(attr_pos_start, attr_pos_end).indices(n)
    for name, value in (("attr_pos_start", attr_pos_start), ("attr_pos_end", attr_pos_end)):
        if value is not None and not -n <= value <= n:
            raise ValueError(f"`{name}`={value} is outside the {n} target positions: use 0..{n}.")
    if end <= start:
        raise ValueError(f"`attr_pos_start`={attr_pos_start} and `attr_pos_end`={attr_pos_end} select "
                         f"no step of the {n} target positions: need start < end.")
    return torch.arange(start, end, device=batch.target_ids.device)


@dataclasses.dataclass(frozen=True)
class Embedded:
    """Embeddings of a batch's two sides; `target` holds the target tokens y_0..y_{T-1}."""

    source: Float[Tensor, "batch src d"]
    target: Float[Tensor, "batch tgt d"]
    start: Float[Tensor, "1 1 d"] | None  # decoder start token (encoder-decoder only)


def embed(handle: EmbeddingHandle, batch: Batch) -> Embedded:
    """The embeddings that the model computes for `batch`, detached."""
    with torch.no_grad():
        src = handle.embed(batch.source_ids, "source")
        tgt = handle.embed(batch.target_ids, "target")
        start = None
        if batch.is_encoder_decoder:
            ids = torch.tensor([[batch.decoder_start_id]], device=batch.target_ids.device)
            start = handle.embed(ids, "target")
    return Embedded(src, tgt, start)


@dataclasses.dataclass(frozen=True)
class Output:
    """A teacher-forced forward: logits of every step and the output layer's input.

    `hidden` is what the output layer (`get_output_embeddings()`) read, `[rows, L, d]`; the
    logits of step t come from `hidden[:, offset + t]` alone. None where the model has no
    separate output layer.
    """

    logits: Float[Tensor, "rows tgt vocab"]
    hidden: Float[Tensor, "rows seq d"] | None
    offset: int

    def at(self, steps: Tensor) -> tuple[Tensor, Tensor] | None:
        """(hidden, positions of `steps` in it), for `step_gradients(..., via=...)`."""
        return None if self.hidden is None else (self.hidden, self.offset + steps)


@contextmanager
def output_layer_inputs(model: Model) -> Iterator[list[Tensor]]:
    """A list that collects what the output layer (`get_output_embeddings()`) reads on each call
    in the body (it stays empty where the model has none); the hook goes on exit."""
    head = model.get_output_embeddings()
    seen: list[Tensor] = []
    hook = None if head is None else head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        yield seen
    finally:
        if hook is not None:
            hook.remove()


def run(
    model: Model,
    batch: Batch,
    handle: EmbeddingHandle,
    source: Float[Tensor, "rows src d"],
    target: Float[Tensor, "rows tgt d"],
    start: Float[Tensor, "1 1 d"] | None = None,
    rows: Int[Tensor, " rows"] | None = None,
) -> Output:
    """One teacher-forced forward when the model reads `source`/`target` embeddings: logits of
    every step `[rows, tgt, vocab]` and the output layer's input.

    `rows[i]` names the batch row that row i of the embeddings belongs to (default: all rows in
    order), so perturbed copies of a batch run in one forward.
    """
    with output_layer_inputs(model) as seen:
        logits = _forward(model, batch, handle, source, target, start, rows)
    hidden = seen[-1] if len(seen) == 1 and seen[0].shape[1] >= logits.shape[1] else None
    return Output(logits, hidden, 0 if hidden is None else hidden.shape[1] - logits.shape[1])


def forward(*args, **kwargs) -> Logits:
    """The logits of `run(...)` (same arguments)."""
    return run(*args, **kwargs).logits


def decoder_inputs(batch: Batch, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A decoder-only model's teacher-forced input for batch `rows`: ids (the source, then every
    target token but the last), attention mask (0/1) and position ids (padding skipped)."""
    ids = torch.cat([batch.source_ids[rows], batch.target_ids[rows][:, :-1]], 1)
    mask = torch.cat([batch.source_mask[rows], batch.target_mask[rows][:, :-1]], 1).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _forward(model, batch, handle, source, target, start, rows):
    if rows is None:
        rows = torch.arange(len(batch), device=source.device)
    src_ids, src_mask = batch.source_ids[rows], batch.source_mask[rows]
    tgt_ids = batch.target_ids[rows]
    n_tgt = tgt_ids.shape[1]
    cls = type(getattr(model, "_orig_mod", model))  # a compiled model's own forward signature
    if batch.is_encoder_decoder:
        dec_ids = torch.cat([torch.full_like(tgt_ids[:, :1], batch.decoder_start_id), tgt_ids[:, :-1]], 1)
        dec_emb = torch.cat([start.expand(len(rows), 1, -1), target[:, :-1]], 1)
        handle.replace(source=source, target=dec_emb)
        out = model(input_ids=src_ids, attention_mask=src_mask.long(), decoder_input_ids=dec_ids,
                    use_cache=False)
        handle.check_used()
        return out.logits
    ids, mask, positions = decoder_inputs(batch, rows)
    kwargs = {"attention_mask": mask, "use_cache": False}
    if _accepts(cls, "position_ids"):
        kwargs["position_ids"] = positions
    if _accepts(cls, "logits_to_keep"):
        kwargs["logits_to_keep"] = n_tgt
    handle.replace(source=torch.cat([source, target[:, :-1]], 1))
    out = model(input_ids=ids, **kwargs)
    handle.check_used()
    return out.logits[:, -n_tgt:]


def for_rows(target_fn: TargetFn, rows: Tensor | None) -> TargetFn:
    """`target_fn` for perturbed copies: row i of the logits belongs to batch row `rows[i]`.

    A target function that holds per-row data (a contrastive forward, say) exposes
    `at_rows(rows)`; plain functions are used as they are.
    """
    at_rows = getattr(target_fn, "at_rows", None)
    return target_fn if rows is None or at_rows is None else at_rows(rows)


def score_steps(
    target_fn: TargetFn, logits: Float[Tensor, "rows tgt vocab"], batch: Batch,
    steps: Int[Tensor, " k"], rows: Int[Tensor, " rows"] | None = None,
) -> Float[Tensor, "rows k"]:
    """`target_fn` at the attributed steps, zero at padding steps."""
    tgt_ids = batch.target_ids if rows is None else batch.target_ids[rows]
    mask = batch.target_mask if rows is None else batch.target_mask[rows]
    scores = for_rows(target_fn, rows)(logits, tgt_ids)
    if scores.shape != tgt_ids.shape:
        raise ValueError(f"the target function returned shape {tuple(scores.shape)}; "
                         f"it must return one score per step, {tuple(tgt_ids.shape)}.")
    return scores[:, steps] * mask[:, steps]


# On CPU, one batched backward over (steps x rows) copies is fastest at about this many copies;
# larger working sets fall out of cache (SmolLM2, 8 rows x 20 steps: 4 steps at a time ran 1.3x
# faster than all 20). Accelerators take all steps at once.
CPU_COPIES_PER_BACKWARD = 32


def _seeds(
    scores: Tensor, via: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """What the batched backward starts from, and its seeds `[step, *start.shape]`.

    Without `via`: the scores, seeded with one-hot rows. With `via` = (hidden, positions): one
    plain backward takes every step's score to the output layer's input at once (step k reads
    only position positions[k]), and the batched backward starts there, so no `[step, rows, tgt,
    vocab]` tensor is ever built.
    """
    k = scores.shape[1]
    if via is None:
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        return scores, eye[:, None, :].expand(k, *scores.shape)
    hidden, positions = via
    (g,) = torch.autograd.grad(scores.sum(), hidden, retain_graph=True, allow_unused=True)
    if g is None:  # e.g. a compiled model: the hooked tensor is not in the autograd graph
        return _seeds(scores, None)
    seeds = torch.zeros(k, *hidden.shape, dtype=g.dtype, device=g.device)
    idx = torch.arange(k, device=g.device)
    seeds[idx, :, positions] = g[:, positions].transpose(0, 1)
    return hidden, seeds


@typechecked
def step_gradients(
    scores: Float[Tensor, "rows step"], inputs: Sequence[Tensor],
    via: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor]:
    """Gradient of every step's score w.r.t. each input: `[rows, step, *input.shape[1:]]`.

    Batched backwards (`is_grads_batched`) over all steps (in groups of about
    `CPU_COPIES_PER_BACKWARD` step x row copies on CPU); a loop of backward passes where
    vmap cannot run the backward (e.g. under `torch.compile`). Rows must not interact (true for
    transformer forwards in eval mode), so summing scores over rows is exact. Pass
    `via=output.at(steps)` (see `run`) to start the batched part at the output layer's input.
    """
    # a compiled graph's backward refuses retain_graph with donated buffers (fnattr.compiled)
    with torch._functorch.config.patch(donated_buffer=False):
        return _step_gradients(scores, inputs, via)


def _step_gradients(scores, inputs, via):
    start, seeds = _seeds(scores, via)
    k = seeds.shape[0]
    try:
        if torch.compiler.is_compiling():
            raise RuntimeError("compiling")
        rows = max(1, start.shape[0])
        chunk = k if start.device.type != "cpu" else max(1, CPU_COPIES_PER_BACKWARD // rows)
        parts = [torch.autograd.grad(start, inputs, part, is_grads_batched=True, allow_unused=True,
                                     materialize_grads=True, retain_graph=True)
                 for part in seeds.split(chunk)]
        grads = [torch.cat(g) for g in zip(*parts)]
    except RuntimeError as err:
        if "compiling" not in str(err):
            warnings.warn(f"batched backward failed ({err}); using one backward per step.", stacklevel=3)
        per_step = [torch.autograd.grad(start, inputs, seeds[i], retain_graph=i < k - 1,
                                        allow_unused=True, materialize_grads=True) for i in range(k)]
        grads = [torch.stack(g) for g in zip(*per_step)]
    return [g.movedim(0, 1) for g in grads]


def causal_target_mask(batch: Batch, steps: Tensor) -> Bool[Tensor, "batch step tgt"]:
    """True where target token j is an input of step k: j < steps[k] and j is not padding."""
    j = torch.arange(batch.target_ids.shape[1], device=steps.device)
    return (j[None, :] < steps[:, None])[None] & batch.target_mask[:, None, :]

"""Per-step gradients with triangular work: step k's backward runs over the positions it reads.

Step k of a decoder-only model reads input positions 0 .. S-1+k (S: the source width), so the
gradient of its score needs none of the later positions. One forward over the whole sequence
makes every step's backward pass over all of them: square work. Here the forward runs in
pieces along the positions, each piece on the key/value cache of the earlier ones *with its
autograd graph*: a piece ends where a group of steps ends, and that group's batched backward
starts from the piece's output, so it passes through that piece and the earlier ones only.
The forward does the same work as one whole forward (plus one call per piece); the backward
does about half the square's work when the target is as long as the prompt.

The pieces are chosen by dynamic programming over a cost counted in positions of one row:
a backward over n steps of `rows` copies whose pieces end at P positions costs n * rows * P,
and every call has a fixed cost that does not shrink with its size: `FORWARD_CALL` for a
forward piece, `BACKWARD_CALL` for a batched backward, and `TRAVERSAL` for each piece a
backward passes through (its per-operation overhead under vmap). These were measured on
SmolLM2-135M on a 2-core CPU (`benchmarks/bench_triangular.py` prints the ratios). A backward
holds at most the step x row copies of one CPU backward (`engine.CPU_COPIES_PER_BACKWARD`).

Used where it is exact and pays: on a CPU, for decoder-only models whose cache is a plain
`DynamicCache` (`_prefix.new_cache`), target functions that read the logits only, and when the
plan has more than one group or stops before the last position. Elsewhere (accelerators, which
take every step in one backward; encoder-decoders; contrast reruns; compiled models) it is the
one forward and the batched backward of `engine.step_gradients`. Layer methods pass the layer's
replaced outputs (`Layer`): each piece reads its positions of them, so layer IG takes the same
route.

Two more things happen here, for every model. A chunk of rows runs without the columns that all
its rows leave padded (`_cropped`; `_buckets` groups rows of like length into chunks). A
compiled model off the CPU takes its per-step gradients from replicated rows and plain
backwards (`_replicated`, not for layer methods), since vmap cannot run a compiled backward.
"""

import dataclasses

import torch
from torch import Tensor

from fnattr import engine
from fnattr.engine import decoder_inputs, output_layer_inputs, score_steps, step_gradients
from fnattr.hooks.layer import LayerHandle
from fnattr.methods import _layers, _prefix
from fnattr.attribution import Context, run_scored
from fnattr.types import TargetFn

# fixed costs, in positions of one row (see the module docstring)
FORWARD_CALL = 150
BACKWARD_CALL = 64
TRAVERSAL = 150
MAX_PIECES = 8
COMPILED_COPIES = 256  # copies of one replicated forward of a compiled model off the CPU
# A compiled model on a CPU keeps the engine's one backward per step: there the replicated
# forward cost more (benchmarks/bench_compile.py; docs/design.md, "torch.compile").
REPLICATE_ON_CPU = False


@dataclasses.dataclass(frozen=True)
class Scored:
    """A forward's logits of every step `[rows, tgt, vocab]`, the attributed steps' scores
    `[rows, step]` (with their graph, except from `_replicated`, whose backward has freed it:
    read them detached) and the gradient of each step's score w.r.t. each input
    `[rows, step, *input.shape[1:]]`."""

    logits: Tensor
    scores: Tensor
    grads: list[Tensor]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A hooked layer's outputs that the forward reads instead of its own (layer methods):
    `calls`, one tensor per call of `hooks`' modules `[rows, seq, *]` (`_layers.join`), whose
    calls have `roles` (`_layers.roles`)."""

    hooks: LayerHandle
    roles: tuple[str, ...]
    calls: list[Tensor]

    def columns(self, src_cols: Tensor, n_src: int, n_tgt: int) -> "Layer":
        """The calls at the source columns `src_cols` (of `n_src`) and the first `n_tgt`
        target tokens (`_cropped`)."""
        cols = {"joint": torch.cat([src_cols, n_src + torch.arange(n_tgt - 1, device=src_cols.device)]),
                "source": src_cols, "target": torch.arange(n_tgt, device=src_cols.device)}
        return Layer(self.hooks, self.roles, [c[:, cols[r].to(c.device)] for c, r in zip(self.calls, self.roles)])


def pieces(reads: list[int], n_rows: int, cap: int) -> list[tuple[int, int]]:
    """Runs `[i, j)` of the steps (sorted; step i reads `reads[i]` positions) that end the
    forward's pieces, at most `MAX_PIECES`, that cost least (see the module docstring)."""
    n = len(reads)
    ends = sorted({*range(max(1, n // 64), n, max(1, n // 64)), n})  # candidate piece ends
    inf = float("inf")
    best = [{0: 0.0}] + [dict() for _ in range(MAX_PIECES)]  # best[g][j]: g pieces end at j
    cut: dict[tuple[int, int], int] = {}
    for g in range(1, MAX_PIECES + 1):
        for j in ends:
            for i, before in best[g - 1].items():
                if i >= j:
                    continue
                calls = -(-(j - i) // cap)
                cost = (before + FORWARD_CALL + (j - i) * n_rows * reads[j - 1]
                        + calls * (BACKWARD_CALL + TRAVERSAL * g))
                if cost < best[g].get(j, inf):
                    best[g][j], cut[g, j] = cost, i
    g = min((g for g in range(1, MAX_PIECES + 1) if n in best[g]), key=lambda g: best[g][n])
    out, j = [], n
    while j > 0:
        out.append((cut[g, j], j))
        j, g = cut[g, j], g - 1
    return out[::-1]


def plan(ctx: Context, target_fn: TargetFn, n_rows: int) -> list[tuple[int, int]] | None:
    """The step groups of a triangular backward for `n_rows` copies, or None where the one
    forward of `engine.step_gradients` is used (see the module docstring)."""
    steps = ctx.steps.tolist()
    if (ctx.batch.source_ids.device.type != "cpu" or torch.compiler.is_compiling()
            or steps != sorted(set(steps)) or _prefix.new_cache(ctx, target_fn) is None):
        return None
    n_src, n_tgt = ctx.batch.source_ids.shape[1], ctx.batch.target_ids.shape[1]
    reads = [n_src + k for k in steps]
    cap = max(1, engine.CPU_COPIES_PER_BACKWARD // max(n_rows, 1))
    out = pieces(reads, n_rows, cap)
    return out if len(out) > 1 or reads[-1] < n_src + n_tgt - 1 else None


def gradients(ctx: Context, target_fn: TargetFn, source: Tensor, target: Tensor,
              inputs: list[Tensor], rows: Tensor | None = None, *, layer: Layer | None = None) -> Scored:
    """`run_scored` at `source`/`target` (rows `rows` of the batch; with `layer`, that layer's
    outputs replaced by its `calls`) and the per-step gradients of `engine.step_gradients`
    w.r.t. `inputs` (tensors that `source`/`target`, or the layer's calls, are built from), by
    step groups on a forward in pieces where `plan` allows (the same values)."""
    if (layer is None and hasattr(ctx.model, "_orig_mod")
            and (source.device.type != "cpu" or REPLICATE_ON_CPU)):
        # a compiled model (its backward cannot run under vmap), at the batch's full width
        got = _replicated(ctx, target_fn, source, target, inputs, rows)
        if got is not None:
            return got
    cropped = _cropped(ctx, target_fn, rows)
    if cropped is not None:  # run without the padding columns that none of `rows` uses
        sub, src_cols, keep = cropped
        n_tgt, n_steps = sub.batch.target_ids.shape[1], len(ctx.steps)
        n_src = ctx.batch.source_ids.shape[1]
        got = gradients(sub, target_fn, source[:, src_cols], target[:, :n_tgt], inputs, rows,
                        layer=None if layer is None else layer.columns(src_cols, n_src, n_tgt))
        wide = ctx.batch.target_ids.shape[1]
        return Scored(_widen(got.logits, 1, torch.arange(n_tgt), wide), _widen(got.scores, 1, keep, n_steps),
                      [_widen(g, 1, keep, n_steps) for g in got.grads])
    n_rows = len(ctx.batch) if rows is None else len(rows)
    parts = plan(ctx, target_fn, n_rows)
    if parts is None or (layer is not None and layer.roles != ("joint",)):
        if layer is None:
            out, scores = run_scored(ctx, target_fn, source, target, rows)
        else:
            out, _, scores = _layers.run_scored(ctx, layer.hooks, layer.roles, target_fn, source,
                                                target, rows, list(layer.calls))
        return Scored(out.logits, scores, step_gradients(scores, inputs, out.at(ctx.steps)))
    if rows is None:
        rows = torch.arange(len(ctx.batch), device=source.device)
    logits, hidden, first = _pieces(ctx, target_fn, source, target, rows, parts, layer)
    scores = score_steps(target_fn, logits, ctx.batch, ctx.steps, rows)
    per_group = []
    for (i, j), h, lo in zip(parts, hidden, first):
        via = None if h is None else (h, ctx.steps[i:j] - lo)
        per_group.append(step_gradients(scores[:, i:j], inputs, via))
    return Scored(logits, scores, [torch.cat(g, 1) for g in zip(*per_group)])


def along_path(ctx: Context, target_fn: TargetFn, x, base, alpha: Tensor, rows: Tensor) -> Scored:
    """`gradients` at `base + alpha (x - base)` (per side; `alpha` [copies 1 1]) for batch
    `rows`; the target side moves, and is an input, only where `ctx.attribute_target`."""
    path = [(b[rows] + alpha * (t[rows] - b[rows])).requires_grad_() for t, b in zip(x, base)]
    tgt = path[1] if ctx.attribute_target else x[1][rows]
    inputs = path if ctx.attribute_target else path[:1]
    return gradients(ctx, target_fn, path[0], tgt, inputs, rows)


def _replicated(ctx: Context, target_fn: TargetFn, source: Tensor, target: Tensor,
                inputs: list[Tensor], rows: Tensor | None) -> Scored | None:
    """`gradients` without vmap, for a compiled model (whose backward vmap cannot run): a group
    of m steps runs m copies of every row in one forward, copy j's score is read at step j only,
    and one plain backward gives all m steps' gradients. Each group holds at most
    `engine.CPU_COPIES_PER_BACKWARD` copies on a CPU (where it runs only with
    `REPLICATE_ON_CPU`), `COMPILED_COPIES` elsewhere. None where
    `inputs` are not `source` and `target` themselves, or the scores read a contrast forward."""
    sides = [source, target][:len(inputs)]
    if any(a is not b for a, b in zip(inputs, sides)) or getattr(target_fn, "contrast", None) is not None:
        return None
    if rows is None:
        rows = torch.arange(len(ctx.batch), device=source.device)
    n_rows, n = len(rows), len(ctx.steps)
    cap = engine.CPU_COPIES_PER_BACKWARD if source.device.type == "cpu" else COMPILED_COPIES
    size = max(1, min(n, cap // n_rows))
    logits, scores, grads = None, [], [[] for _ in inputs]
    for lo in range(0, n, size):
        sub = dataclasses.replace(ctx, steps=ctx.steps[lo:lo + size])
        m = len(sub.steps)
        copies = [x.detach().repeat_interleave(m, 0).requires_grad_() for x in inputs]
        tgt = copies[1] if len(copies) > 1 else target.detach().repeat_interleave(m, 0)
        out, got = run_scored(sub, target_fn, copies[0], tgt, rows.repeat_interleave(m))
        own = got.view(n_rows, m, m).diagonal(dim1=1, dim2=2)  # copy j of each row at step j
        for acc, g in zip(grads, torch.autograd.grad(own.sum(), copies, allow_unused=True,
                                                     materialize_grads=True)):
            acc.append(g.view(n_rows, m, *g.shape[1:]))
        if logits is None:
            logits = out.logits.view(n_rows, m, *out.logits.shape[1:])[:, 0].detach()
        scores.append(own.detach())
        del out, got, own
    return Scored(logits, torch.cat(scores, 1), [torch.cat(g, 1) for g in grads])


def _cropped(ctx: Context, target_fn: TargetFn,
             rows: Tensor | None) -> tuple[Context, Tensor, Tensor] | None:
    """`ctx` without the source and target columns that are padding in every row of `rows`
    (e.g. a chunk of short rows in a batch padded to a long one), the source columns kept and
    the steps kept (those the kept target columns hold); None where nothing is dropped, or where
    a contrast target reads the whole batch's columns."""
    if getattr(target_fn, "contrast", None) is not None:
        return None
    batch = ctx.batch
    src_cols, tgt_cols = batch.used_columns(rows)
    n_tgt = max(len(tgt_cols), int(ctx.steps.min()) + 1)  # at least one attributed step
    if len(src_cols) == batch.source_ids.shape[1] and n_tgt == batch.target_ids.shape[1]:
        return None
    if len(src_cols) and int(src_cols[-1] - src_cols[0]) + 1 != len(src_cols):
        return None  # not one run of columns (never with `prepare`'s padding)
    keep = (ctx.steps < n_tgt).nonzero().squeeze(1)
    tgt_cols = torch.arange(n_tgt, device=src_cols.device)
    emb = ctx.embedded
    sub = dataclasses.replace(
        ctx, batch=batch.columns(src_cols, tgt_cols), steps=ctx.steps[keep],
        embedded=dataclasses.replace(emb, source=emb.source[:, src_cols], target=emb.target[:, :n_tgt]))
    return sub, src_cols, keep


def _widen(t: Tensor, dim: int, at: Tensor, size: int) -> Tensor:
    """`t` laid out at indexes `at` of a dim `dim` of `size`, zero elsewhere."""
    if t.shape[dim] == size:
        return t
    out = t.new_zeros(*t.shape[:dim], size, *t.shape[dim + 1:])
    return out.index_copy(dim, at.to(t.device), t)


def _pieces(ctx: Context, target_fn: TargetFn, source: Tensor, target: Tensor, rows: Tensor,
            parts: list[tuple[int, int]], layer: Layer | None = None
            ) -> tuple[Tensor, list[Tensor | None], list[int]]:
    """The forward in pieces that end where each step group's last step reads: the logits of
    steps 0 .. last `[rows, tgt, vocab]` (zero after the last attributed step), each piece's
    output-layer input (None where not seen) and the step its first logits belong to. A
    decoder-only `layer` (one joint call) reads its call's positions of each piece."""
    model, batch = ctx.model, ctx.batch
    ids, mask, positions = decoder_inputs(batch, rows)
    embeds = torch.cat([source, target[:, :-1]], 1)
    n_src, n_tgt = batch.source_ids.shape[1], batch.target_ids.shape[1]
    cache = _prefix.new_cache(ctx, target_fn)
    logits, hidden, first, lo = [], [], [], 0
    with output_layer_inputs(model) as seen:
        for _, j in parts:
            hi = n_src + int(ctx.steps[j - 1])  # step k's logits sit at position n_src - 1 + k
            keep = hi - max(lo, n_src - 1)
            ctx.handle.replace(source=embeds[:, lo:hi])
            if layer is not None:
                layer.hooks.take()
                layer.hooks.replace(layer.calls[0][:, lo:hi])
            seen.clear()
            out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi],
                        position_ids=positions[:, lo:hi], past_key_values=cache, use_cache=True,
                        logits_to_keep=keep)
            ctx.handle.check_used()
            if layer is not None:
                layer.hooks.check_used()
                layer.hooks.take()
            logits.append(out.logits)
            ok = len(seen) == 1 and seen[0].shape[1] == keep
            hidden.append(seen[0] if ok else None)
            first.append(hi - keep - (n_src - 1))
            lo = hi
    got = torch.cat(logits, 1)
    rest = got.new_zeros(len(rows), n_tgt - got.shape[1], got.shape[2])
    return torch.cat([got, rest], 1), hidden, first

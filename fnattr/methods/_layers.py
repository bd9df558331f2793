"""Map a layer's outputs to source and target positions, and run the model with them replaced.

Each call of the hooked layer in one forward has a role:
- "joint" (decoder-only): the sequence is the prompt then y_0..y_{T-2}, so position i < src is
  source token i and position src + j is target token j (the last target token is not fed);
- "source" (encoder layer): position i is source token i;
- "target" (decoder layer of an encoder-decoder): position 0 is the decoder start token, position
  j + 1 is target token j. The start position is never attributed; it keeps its actual value.
Split activations put target token j at index j; index T-1 (never fed) holds zeros.
"""

import dataclasses

import torch
from torch import Tensor, nn

from fnattr.engine import Output, score_steps
from fnattr.engine import run as run_model
from fnattr.hooks.embedding import embedding_modules
from fnattr.hooks.layer import LayerHandle
from fnattr.attribution import Context, at_input, finish, without_shortcut
from fnattr.result import AttributionTensors
from fnattr.types import TargetFn


@dataclasses.dataclass(frozen=True)
class Acts:
    """A layer's activations by position: source [rows src *], target [rows tgt *], start [rows 1 *]."""

    source: Tensor | None
    target: Tensor | None
    start: Tensor | None

    def rows(self, rows: Tensor) -> "Acts":
        return Acts(*(None if t is None else t[rows] for t in (self.source, self.target, self.start)))


def default_layer(model: nn.Module) -> list[nn.Module]:
    """The input embedding layer(s): one module, or the encoder's and decoder's."""
    return list({id(m): m for m in embedding_modules(model).values()}.values())


def _inside(module: nn.Module, stack: nn.Module) -> bool:
    return any(m is module for m in stack.modules())


def roles(model: nn.Module, modules: list[nn.Module]) -> tuple[str, ...]:
    """The role of each call of `modules` in one forward, in call order."""
    if not model.config.is_encoder_decoder:
        if len(modules) != 1:
            raise ValueError(f"`layer` names {len(modules)} modules: a decoder-only model takes one.")
        return ("joint",)
    found = set()
    for module in modules:
        sides = {s for s, stack in (("source", model.get_encoder()), ("target", model.get_decoder()))
                 if _inside(module, stack)}
        if not sides:
            raise ValueError(f"`layer` {type(module).__name__} is in neither the encoder nor the "
                             "decoder: name a module inside one of them.")
        if sides & found:
            raise ValueError("`layer` names two modules on the same side: name one per side.")
        found |= sides
    return tuple(s for s in ("source", "target") if s in found)


def check_sides(roles: tuple[str, ...], attribute_target: bool) -> None:
    has_src = "joint" in roles or "source" in roles
    has_tgt = "joint" in roles or "target" in roles
    if attribute_target and not has_tgt:
        raise ValueError("`layer` is an encoder layer: its positions are source positions only; "
                         "pass attribute_target=False or name a decoder layer.")
    if not has_src and not attribute_target:
        raise ValueError("`layer` is a decoder layer of an encoder-decoder model: its positions are "
                         "target positions; pass attribute_target=True.")


def _pad_last(t: Tensor, dim: int) -> Tensor:
    shape = list(t.shape)
    shape[dim] = 1
    return torch.cat([t, t.new_zeros(shape)], dim)


def split(calls: list[Tensor], roles: tuple[str, ...], n_src: int, dim: int = 1) -> Acts:
    """Per-call tensors (sequence along `dim`) -> source / target / start positions."""
    if len(calls) != len(roles):
        raise RuntimeError(f"`layer` ran {len(calls)} times in one forward; expected {len(roles)} "
                           f"({', '.join(roles)}): name a module that runs once per side.")
    src = tgt = start = None
    for call, role in zip(calls, roles):
        if role == "joint":
            src = call.narrow(dim, 0, n_src)
            tgt = _pad_last(call.narrow(dim, n_src, call.shape[dim] - n_src), dim)
        elif role == "source":
            src = call
        else:
            start, tgt = call.narrow(dim, 0, 1), _pad_last(call.narrow(dim, 1, call.shape[dim] - 1), dim)
    return Acts(src, tgt, start)


def join(acts: Acts, roles: tuple[str, ...]) -> list[Tensor]:
    """Inverse of `split` (activations, sequence on dim 1): one tensor per call."""
    out = []
    for role in roles:
        if role == "joint":
            out.append(torch.cat([acts.source, acts.target[:, :-1]], 1))
        elif role == "source":
            out.append(acts.source)
        else:
            out.append(torch.cat([acts.start, acts.target[:, :-1]], 1))
    return out


def run(ctx: Context, hooks: LayerHandle, roles: tuple[str, ...], source: Tensor, target: Tensor,
        rows: Tensor | None = None, replace: list | None = None) -> tuple[Output, list[Tensor]]:
    """The forward's output (logits, output-layer input) when the model reads `source`/`target` embeddings (and the layer's outputs are
    replaced by `replace`, one item per call), and the layer's output of each call."""
    hooks.take()
    if replace is not None:
        hooks.replace(*replace)
    out = run_model(ctx.model, ctx.batch, ctx.handle, source, target, ctx.embedded.start, rows)
    hooks.check_used()
    calls = hooks.take()
    if len(calls) != len(roles):
        raise RuntimeError(f"`layer` ran {len(calls)} times in one forward; expected {len(roles)} "
                           f"({', '.join(roles)}): name a module that runs once per side.")
    return out, calls


def _shared_calls(ctx: Context, hooks: LayerHandle, roles: tuple[str, ...], contrast,
                  calls: list[Tensor]) -> list:
    """Replacements for the contrast forward's calls of the layer: at the positions whose layer
    output is the same function of the shared side in both forwards, the attributed forward's
    output (so gradients flow); elsewhere the contrast's own output.

    Source positions are shared at any layer (causal masking; the encoder reads only the
    source). Target positions are shared only at the embedding layer, since deeper target
    activations also read the contrast's own source."""
    n_src = ctx.batch.source_ids.shape[1]
    embedding = all(any(m is e for e in default_layer(ctx.model)) for m in hooks.modules)
    out = []
    for call, role in zip(calls, roles):
        if role == "joint" and contrast.shared == "source":
            out.append(lambda own, c=call: torch.cat([c[:, :n_src], own[:, n_src:]], 1))
        elif role == "joint" and contrast.shared == "target" and embedding:
            n_c = contrast.batch.source_ids.shape[1]
            out.append(lambda own, c=call, n_c=n_c: torch.cat([own[:, :n_c], c[:, n_src:]], 1))
        elif role == contrast.shared and (role == "source" or embedding):
            out.append(lambda own, c=call: c)
        else:
            out.append(lambda own: own)
    return out


def run_scored(ctx: Context, hooks: LayerHandle, roles: tuple[str, ...], target_fn: TargetFn,
               source: Tensor, target: Tensor, rows: Tensor | None = None,
               replace: list | None = None) -> tuple[Output, list[Tensor], Tensor]:
    """`run`, and the target's score of every attributed step `[rows, step]`. A contrastive
    target sharing a side with the input reruns its contrast with the layer's shared positions
    taken from this forward (see `_shared_calls`), so its term carries its gradient."""
    out, calls = run(ctx, hooks, roles, source, target, rows, replace)
    fn, contrast = target_fn, getattr(target_fn, "contrast", None)
    if contrast is not None and contrast.shared is not None:
        hooks.replace(*_shared_calls(ctx, hooks, roles, contrast, calls))
        fn = at_input(ctx, target_fn, source, target, rows)
        hooks.check_used()
        hooks.take()
    return (without_shortcut(out, fn is not target_fn), calls,
            score_steps(fn, out.logits, ctx.batch, ctx.steps, rows))


def extra_dims(acts: Acts) -> tuple[str, ...]:
    t = acts.source if acts.source is not None else acts.target
    return ("hidden",) if t.ndim == 3 else tuple(f"dim{i}" for i in range(2, t.ndim))


def finish_layer(ctx: Context, method: str, args: dict, target_fn, attr: Acts, scores: dict,
                 like: Acts) -> AttributionTensors:
    """`finish` for scores by layer position (`like`: the layer's activations, for the shape)."""
    src = attr.source
    if src is None:  # a decoder layer of an encoder-decoder: no source position in it
        src = like.target.new_zeros(len(ctx.batch), len(ctx.steps), ctx.batch.source_ids.shape[1],
                                    *like.target.shape[2:])
    return finish(ctx, method=method, args=args, target_fn=target_fn, source=src,
                  target=attr.target if ctx.attribute_target else None, step_scores=scores,
                  extra_dims=extra_dims(like))

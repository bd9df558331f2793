"""The method-running core: what every method shares.

`attribution_context` validates a call, then freezes the model and hooks its embeddings inside
restoring context managers and yields a `Context`; `run_scored` and `at_input` run the model
and score its steps (contrastive targets included); `finish` masks padding, checks the scores
are finite and builds the `AttributionTensors` with its metadata (`call_args`: the options).
A method of your own uses the same three steps (docs/adding-a-method.md).
"""

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor

from fnattr import baselines
from fnattr import targets as _targets
from fnattr.batch import Batch
from fnattr.contrast import rerun
from fnattr.engine import Embedded, Output, causal_target_mask, embed, forward, run, score_steps, step_range
from fnattr.hooks.attention import eager_experts, finite_masks
from fnattr.hooks.embedding import EmbeddingHandle, embedding_hooks
from fnattr.hooks.frozen import frozen
from fnattr.result import AttributionTensors
from fnattr.types import Logits, Model, TargetFn

StepScoreSpec = Sequence[str | TargetFn]



def fn_name(fn: TargetFn) -> str:
    """The name a target function is recorded under (`meta["target_fn"]`, step score keys)."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "target")


def resolve_step_scores(specs: StepScoreSpec) -> dict[str, TargetFn]:
    """Names of built-in target functions or callables -> {name: function}."""
    out = {}
    for spec in specs:
        if isinstance(spec, str):
            if spec not in _targets.TARGETS:
                raise ValueError(f"`step_scores` names unknown {spec!r}: use one of "
                                 f"{sorted(_targets.TARGETS)} or pass a function.")
            out[spec] = _targets.TARGETS[spec]
        else:
            out[fn_name(spec)] = spec
    return out


@dataclasses.dataclass(frozen=True)
class Context:
    model: Model
    batch: Batch
    handle: EmbeddingHandle
    embedded: Embedded
    steps: Tensor
    attribute_target: bool


@contextmanager
def attribution_context(
    model: Model, batch: Batch, *, attribute_target: bool | None,
    attr_pos_start: int | None, attr_pos_end: int | None,
) -> Iterator[Context]:
    """Validate, then freeze the model and hook its embeddings for the body; restore on exit."""
    if bool(model.config.is_encoder_decoder) != batch.is_encoder_decoder:
        kind = "an encoder-decoder" if batch.is_encoder_decoder else "a decoder-only"
        raise ValueError(f"`batch` was prepared for {kind} model: call prepare() with this model.")
    steps = step_range(batch, attr_pos_start, attr_pos_end)
    if attribute_target is None:
        attribute_target = not batch.is_encoder_decoder
    batch = batch.to(model.device)
    with ExitStack() as stack:
        stack.enter_context(frozen(model))
        if any(p.dtype == torch.float64 for p in model.parameters()):  # padded rows stay finite,
            stack.enter_context(finite_masks(model))                   # experts run without grouped_mm
            stack.enter_context(eager_experts(model))
        handle = stack.enter_context(embedding_hooks(model))
        yield Context(model, batch, handle, embed(handle, batch), steps.to(model.device),
                      attribute_target)


def at_input(ctx: Context, target_fn: TargetFn, source: Tensor, target: Tensor,
             rows: Tensor | None = None) -> TargetFn:
    """`target_fn` as a function of the input `source`/`target` (rows `rows` of the batch).

    A plain target function reads only the logits and is returned as it is. A contrastive one
    whose contrast shares a side with the attributed input (`fnattr.contrast.Contrast.shared`)
    gets its contrast rerun at this input, with gradients, so that its attributions are those
    of the whole contrastive expression."""
    contrast = getattr(target_fn, "contrast", None)
    if contrast is None:
        return target_fn
    c_logits = rerun(contrast, ctx.model, ctx.handle, source, target, ctx.embedded.start, rows)
    return target_fn if c_logits is None else target_fn.with_contrast(c_logits, rows)


def run_scored(ctx: Context, target_fn: TargetFn, source: Tensor, target: Tensor,
               rows: Tensor | None = None) -> tuple[Output, Tensor]:
    """One forward at `source`/`target` (rows `rows`) and the target's score of every attributed
    step `[rows, step]`, contrastive terms included (see `at_input`)."""
    out = run(ctx.model, ctx.batch, ctx.handle, source, target, ctx.embedded.start, rows)
    fn = at_input(ctx, target_fn, source, target, rows)
    return without_shortcut(out, fn is not target_fn), score_steps(fn, out.logits, ctx.batch,
                                                                   ctx.steps, rows)


def perturbed_inputs(ctx: Context, masks: tuple[Tensor, Tensor], fills: tuple[Tensor, Tensor],
                     pick: Tensor | slice, rows: Tensor) -> list[Tensor]:
    """Source and target embeddings of copies `pick` (of batch `rows`) whose masked tokens
    (masks [n pos]) or masked embedding coordinates ([n pos d]) read the `fills` embeddings."""
    emb = ctx.embedded
    return [torch.where(m[pick] if m.dim() == 3 else m[pick, :, None], f[rows], x[rows])
            for m, f, x in zip(masks, fills, (emb.source, emb.target))]


def without_shortcut(out: Output, contrast_rerun: bool) -> Output:
    """`out`, without the output-layer shortcut of the batched backward when the scores also
    depend on a contrast forward (whose graph does not pass through `out.hidden`)."""
    return dataclasses.replace(out, hidden=None) if contrast_rerun else out


def clean_logits(ctx: Context) -> Logits:
    """Logits of every step at the unperturbed input, without an autograd graph."""
    emb = ctx.embedded
    with torch.no_grad():
        return forward(ctx.model, ctx.batch, ctx.handle, emb.source, emb.target, emb.start)


def logit_step_scores(
    ctx: Context, logits: Logits, target_fn: TargetFn, extra: StepScoreSpec
) -> dict[str, Tensor]:
    """The attributed target's score and the requested step scores, from one forward's logits."""
    fns = {fn_name(target_fn): target_fn, **resolve_step_scores(extra)}
    with torch.no_grad():
        return {name: score_steps(fn, logits.detach(), ctx.batch, ctx.steps).detach()
                for name, fn in fns.items()}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("fnattr", "torch", "transformers", "captum"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


# options a method takes that do not change its numbers, so `meta["args"]` leaves them out
NOT_RECORDED = ("step_scores", "progress")


def call_args(method: Callable, values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of this call of `method` (its keyword-only parameters, read from the call's
    `locals()` at the top of its body): what its result records in `meta["args"]`.

    >>> args = call_args(saliency, locals())   # {"abs": True, "attribute_target": None, ...}
    """
    params = inspect.signature(inspect.unwrap(method)).parameters.values()
    return {p.name: values[p.name] for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in NOT_RECORDED}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)}>"
    if isinstance(value, torch.Generator):
        return "torch.Generator"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if hasattr(value, "to_meta"):
        return value.to_meta()
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return getattr(value, "__name__", repr(value))


def baseline_meta(batch: Batch, args: Mapping[str, Any], *, attribute_target: bool,
                  method: str | None = None) -> dict[str, str]:
    """`meta["baseline"]` (the baseline used, in words) and `meta["baseline_kind"]` for a method
    with a `baseline` argument; nothing for the others."""
    if "baseline" not in args:
        return {}
    return baselines.baseline_meta(batch, args["baseline"], attribute_target=attribute_target,
                                   method=method)


# rules that take a gradient at the baseline itself (alpha = 0), where a zero baseline overflows
# in a bias-free model: every RMSNorm of an all-zero residual stream scales it by 1/sqrt(eps)
AT_BASELINE = ("riemann_left", "riemann_trapezoid")


def _baseline_hint(ctx: Context, method: str, baseline: Any) -> str:
    """The remedy when a method's own arithmetic overflowed: the baseline it started from."""
    from fnattr import baselines  # here, not at the top: fnattr.baselines imports this module

    specs = baseline if isinstance(baseline, (list, tuple)) else [baseline]
    kinds = [baselines.resolve_baseline(ctx.batch, b, method)[0] for b in specs
             if isinstance(b, Tensor) or b in baselines.KINDS]
    if "zeros" in kinds:
        return ("; the baseline is the zero vector, which is singular on a model with RMSNorm and "
                "no biases (Llama): a zero input gives an all-zero stream, where the norm scales by "
                "1/sqrt(eps). Pass another `baseline`: 'unk', 'pad' or a tensor (CLI: "
                "`--arg baseline=unk`)")
    return (f"; `baseline`={'tensor' if isinstance(baseline, Tensor) else baseline!r} resolved to "
            f"{'/'.join(kinds) or 'a tensor'}: try another `baseline` ('unk', 'pad', 'zeros' or a "
            "tensor, CLI `--arg baseline=...`) or the model in float64")


def check_finite(ctx: Context, method: str, parts: Mapping[str, Tensor | None],
                 args: Mapping[str, Any] | None = None) -> None:
    """Raise if any result `[batch, step, ...]` is NaN or infinite at a real step, naming the rows
    and the steps, and whether the model's own output (a step score) is already non-finite there;
    `args` (the method's options) name a path rule's fix where its rule is the likely cause."""
    real = ctx.batch.target_mask[:, ctx.steps]
    bad = {name: ~torch.isfinite(t.flatten(2) if t.ndim > 2 else t[..., None]).all(-1) & real
           for name, t in parts.items() if t is not None and t.ndim >= 2}
    rows = sorted({int(r) for b in bad.values() for r in b.any(1).nonzero().flatten()})
    if not rows:
        return
    where = "; ".join(f"row {r} at steps {ctx.steps[torch.stack(list(bad.values())).any(0)[r]].tolist()}"
                      for r in rows)
    fields = sorted(name for name, b in bad.items() if b.any())
    scored = [name for name in fields if name not in ("source", "target", "delta")]
    cause = (f"the model's own output is not finite there (step score {scored[0]!r}): a NaN or "
             "infinite weight, or an overflow in this dtype" if scored else
             "the model's output is finite there, so they arise in the method's own forwards or "
             "gradients")
    padded = [r for r in rows if not (ctx.batch.source_mask[r].all() and ctx.batch.target_mask[r].all())]
    hint = (f"; rows {padded} are padded: if a row is finite alone (`batch.select([{padded[0]}])`), "
            "padding is the cause" if padded else "")
    rule = (args or {}).get("method")
    if not scored and rule in AT_BASELINE and method in ("integrated_gradients",
                                                         "layer_integrated_gradients"):
        hint += (f"; `method`={rule!r} takes a gradient at the baseline itself (alpha = 0), which "
                 "overflows where the baseline is the zero vector and the model has RMSNorm and no "
                 "biases (Llama): use method='gausslegendre', 'riemann_right' or 'adaptive', or "
                 "another `baseline`")
    elif not scored and "baseline" in (args or {}):
        hint += _baseline_hint(ctx, method, args["baseline"])
    raise FloatingPointError(f"`{method}` gave non-finite values (NaN or inf) in {', '.join(fields)}: "
                             f"{where}. {cause[0].upper()}{cause[1:]}{hint}.")


def finish(
    ctx: Context, *, method: str, args: Mapping[str, Any], target_fn: TargetFn,
    source: Tensor, target: Tensor | None, step_scores: dict[str, Tensor],
    delta: Tensor | None = None, extra_dims: tuple[str, ...] = ("hidden",),
) -> AttributionTensors:
    """Mask padding and invisible positions to exact zeros and build the result (on CPU)."""
    batch, extra = ctx.batch, (None,) * len(extra_dims)
    step_mask = batch.target_mask[:, ctx.steps]
    scored = batch.source_mask
    if batch.source_template is not None:  # chat-template tokens not attributed (prepare(chat=True))
        scored = scored & ~(batch.source_template & batch.source_special)
    source = source.where((step_mask[:, :, None] & scored[:, None, :])[(..., *extra)], 0)
    if target is not None:
        target = target.where((step_mask[:, :, None] & causal_target_mask(batch, ctx.steps))[(..., *extra)], 0)
    check_finite(ctx, method, {"source": source, "target": target, "delta": delta, **step_scores}, args)
    meta = {
        "method": method,
        "args": json.dumps({k: _jsonable(v) for k, v in args.items()}),
        "target_fn": fn_name(target_fn),
        "model": str(getattr(ctx.model.config, "name_or_path", "") or type(ctx.model).__name__),
        "model_class": type(ctx.model).__name__,
        "is_encoder_decoder": str(batch.is_encoder_decoder).lower(),
        "versions": json.dumps(_versions()),
        **baseline_meta(batch, args, attribute_target=ctx.attribute_target, method=method),
    }
    if batch.source_template is not None:  # chat: the template's unattributed tokens, per row
        template = (batch.source_template & batch.source_special).cpu()
        meta["template"] = json.dumps([row.nonzero().flatten().tolist() for row in template])
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return AttributionTensors(
        source=cpu(source), target=cpu(target), steps=cpu(ctx.steps),
        step_scores={k: cpu(v) for k, v in step_scores.items()},
        source_ids=cpu(batch.source_ids), target_ids=cpu(batch.target_ids),
        source_mask=cpu(batch.source_mask), target_mask=cpu(batch.target_mask),
        source_tokens=batch.source_tokens, target_tokens=batch.target_tokens,
        extra_dims=extra_dims, delta=cpu(delta),
        meta=meta if batch.group_by is None else {**meta, "group_by": batch.group_by},
        source_groups=cpu(batch.source_groups), group_texts=batch.source_group_texts,
    )

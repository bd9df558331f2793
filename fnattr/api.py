"""`attribute`: prepare a batch and run one method by name, in one call (`prepare_call` is the
preparing half, shared with the command line and dataset runs)."""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fnattr import defaults, request
from fnattr import targets as _targets
from fnattr.batch import Batch, prepare
from fnattr.contrast import Alignments, Contrast, ContrastContext, force_inputs, prepare_contrast
from fnattr.engine import score_steps, step_range
from fnattr.methods import METHODS
from fnattr.attribution import (
    StepScoreSpec, attribution_context, clean_logits, resolve_step_scores,
)
from fnattr.progress import status
from fnattr.result import AttributionTensors
from fnattr.types import Model, TargetFn


def get_method(method: str | Callable) -> Callable:
    """The method function for `method` (a name from `fnattr.methods.METHODS`, or a function)."""
    if callable(method):
        return method
    if method not in METHODS:
        raise ValueError(f"`method`={method!r} is unknown: use one of {sorted(METHODS)}.")
    return METHODS[method]


def _options(factory: Callable, options: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    """The keyword-only options of `factory` found in `options` (marked as used)."""
    params = inspect.signature(factory).parameters
    names = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    used.update(n for n in names if n in options)
    return {n: options[n] for n in names if n in options}


def resolve_target(
    spec: str | TargetFn, *, model: Model, batch: Batch, contrast: Contrast | None,
    options: Mapping[str, Any], used: set[str],
) -> TargetFn:
    """A target function from a name (built with `contrast` / `model` where it needs them).

    Names: `fnattr.targets.TARGETS`, `CONTRAST_TARGETS` (need a contrast), `MODEL_TARGETS`;
    `options` (e.g. `top_p`, `n_mcd_steps`) go to the functions that take them.
    """
    if not isinstance(spec, str):
        return spec
    if spec in _targets.TARGETS:
        fn = _targets.TARGETS[spec]
        kwargs = _options(fn, options, used)
        return functools.partial(fn, **kwargs) if kwargs else fn
    if spec in _targets.CONTRAST_TARGETS:
        if contrast is None:
            raise ValueError(f"{spec!r} compares with a contrastive input: pass `contrast_targets=` "
                             "and/or `contrast_sources=`.")
        factory = _targets.CONTRAST_TARGETS[spec]
        return factory(contrast, **_options(factory, options, used))
    if spec in _targets.MODEL_TARGETS:
        factory = _targets.MODEL_TARGETS[spec]
        return factory(model, batch, **_options(factory, options, used))
    known = sorted({*_targets.TARGETS, *_targets.CONTRAST_TARGETS, *_targets.MODEL_TARGETS})
    raise ValueError(f"target function {spec!r} is unknown: use one of {known} or pass a function.")


def _uses_contrast(specs: Sequence[str | TargetFn]) -> bool:
    return any(isinstance(s, str) and s in _targets.CONTRAST_TARGETS for s in specs)


@dataclasses.dataclass(frozen=True)
class Call:
    """A call made ready to run: the batch a method reads, the resolved target function and step
    scores, and the contrast they compare with (None without one)."""

    batch: Batch
    target_fn: TargetFn
    step_scores: list[TargetFn]
    contrast: Contrast | None


def prepare_call(
    model: Model, tokenizer: PreTrainedTokenizerBase, sources: str | Sequence[str],
    targets: str | Sequence[str] | None = None, *, target_fn: TargetFn | str = defaults.TARGET_FN,
    step_scores: Sequence[str | TargetFn] = (), contrast_targets: str | Sequence[str] | None = None,
    contrast_sources: str | Sequence[str] | None = None, contrast_targets_alignments: Alignments = None,
    contrast_force_inputs: bool = False, contrast_context: ContrastContext = "same",
    target_args: Mapping[str, Any] | None = None, progress: bool = False, **prepare_options: Any,
) -> Call:
    """Prepare the batch (tokenize, generate or force `targets`), the contrast and the target
    functions of one call: the one step that `attribute`, the command line and dataset runs share.

    `prepare_options` go to `fnattr.prepare` (`max_new_tokens`, `chat`, `system`, ...); the
    contrastive arguments and `target_args` are those of `attribute`.

    >>> call = prepare_call(model, tok, "The capital of France is", target_fn="probability")
    >>> out = fnattr.methods.saliency(model, call.batch, call.target_fn)
    """
    specs = [target_fn, *step_scores]
    has_contrast = contrast_targets is not None or contrast_sources is not None
    if has_contrast != _uses_contrast(specs) or (contrast_targets_alignments is not None
                                                 and contrast_targets is None):
        raise ValueError("contrastive arguments and functions go together: pass `contrast_targets=` "
                         "(and optionally `contrast_sources=`, `contrast_targets_alignments=`) "
                         "with a contrastive `target_fn` or step score, e.g. 'contrast_prob_diff'.")
    if contrast_force_inputs and not has_contrast:
        raise ValueError("`contrast_force_inputs=True` attributes on the contrastive inputs: pass "
                         "`contrast_targets=` and/or `contrast_sources=` with a contrastive target_fn.")
    max_new_tokens = prepare_options.get("max_new_tokens", defaults.MAX_NEW_TOKENS)
    with status(progress and targets is None, f"generating up to {max_new_tokens} tokens"):
        batch = prepare(model, tokenizer, sources, targets, **prepare_options)
    contrast = None
    if has_contrast:
        contrast = prepare_contrast(model, tokenizer, batch, contrast_targets=contrast_targets,
                                    contrast_sources=contrast_sources,
                                    contrast_targets_alignments=contrast_targets_alignments,
                                    contrast_context=contrast_context)
        if contrast_force_inputs:
            batch, contrast = force_inputs(model, batch, contrast)
    options, used = dict(target_args or {}), set()
    resolve = functools.partial(resolve_target, model=model, batch=batch, contrast=contrast,
                                options=options, used=used)
    call = Call(batch, resolve(target_fn), [resolve(s) for s in step_scores], contrast)
    if unused := sorted(set(options) - used):
        raise ValueError(f"`target_args` {unused} are options of none of the target functions used.")
    return call


def attribute(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    sources: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    *,
    method: str | Callable = defaults.METHOD,
    target_fn: TargetFn | str = defaults.TARGET_FN,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    chat: bool = False,
    system: str | None = None,
    keep_template: bool = False,
    generate_kwargs: dict[str, Any] | None = None,
    contrast_targets: str | Sequence[str] | None = None,
    contrast_sources: str | Sequence[str] | None = None,
    contrast_targets_alignments: Alignments = None,
    contrast_context: ContrastContext = "same",
    contrast_force_inputs: bool = False,
    target_args: Mapping[str, Any] | None = None,
    skip_special_tokens: bool = False,
    include_eos_baseline: bool = False,
    generate_from_target_prefix: bool = False,
    groups: Any = None,
    progress: bool = False,
    **method_args: Any,
) -> AttributionTensors:
    """Tokenize, generate (or force `targets`), and attribute with `method`, in one call.

    `target_fn` and the names in `step_scores=` may name built-in functions
    (`fnattr.targets.TARGETS`, `CONTRAST_TARGETS`, `MODEL_TARGETS`). The contrastive ones read
    `contrast_targets` / `contrast_sources` (one per source), aligned by
    `contrast_targets_alignments` (None, "auto", or (target, contrast) position pairs), run once
    at the clean input (`fnattr.contrast.prepare_contrast`); methods rerun the contrast at each
    perturbed input on the side it shares with the attributed input, so its term carries its
    gradient. `contrast_context` ("same", default, or "own") is the prefix a contrast token is
    scored under: the attributed target's, p(y'_t | x, y_<t), or the contrast's own,
    p(y'_t | x, y'_<t) (see `fnattr.contrast`). `target_args` holds their options
    (`top_k`, `top_p`, `filter_strategy`, `n_mcd_steps`, `seed`). `chat=True` writes each
    source as the user's turn of the tokenizer's chat template (after a `system` turn if given) and keeps the template's
    tokens out of the attributed source unless `keep_template=True` (see `prepare`).
    `progress=True` shows the generation and the
    method's progress on stderr (`fnattr.progress`); it does not change the result.
    `contrast_force_inputs=True` attributes on the contrast's own inputs
    (`fnattr.contrast.force_inputs`: the result's source and target are the contrast's).
    `skip_special_tokens`, `include_eos_baseline`, `generate_from_target_prefix` and `groups`
    (feature groups, `fnattr.groups`: "sentences", "documents", ...) go to `prepare`.

    >>> out = attribute(model, tok, "The capital of France is", method="integrated_gradients",
    ...                 max_new_tokens=4, n_steps=32)
    >>> out = attribute(model, tok, "The capital of France is", " Paris.",
    ...                 target_fn="contrast_prob_diff", contrast_targets=" Rome.",
    ...                 step_scores=["entropy", "contrast_prob"])
    """
    fn = get_method(method)  # fail on a bad name before generating
    asked = dict(method_args)  # as given, for meta["request"]
    call = prepare_call(
        model, tokenizer, sources, targets, target_fn=target_fn,
        step_scores=method_args.get("step_scores", ()), contrast_targets=contrast_targets,
        contrast_sources=contrast_sources, contrast_targets_alignments=contrast_targets_alignments,
        contrast_force_inputs=contrast_force_inputs, contrast_context=contrast_context,
        target_args=target_args, progress=progress,
        max_new_tokens=max_new_tokens, chat=chat, system=system, keep_template=keep_template,
        skip_special_tokens=skip_special_tokens, include_eos_baseline=include_eos_baseline,
        generate_from_target_prefix=generate_from_target_prefix, groups=groups,
        **(generate_kwargs or {}))
    if "step_scores" in method_args:
        method_args["step_scores"] = call.step_scores
    if progress:  # only when asked: a method of one's own need not take `progress`
        method_args["progress"] = True
    out = fn(model, call.batch, call.target_fn, **method_args)
    return request.record(
        out, model=model, sources=sources, method=method, target_fn=target_fn, method_args=asked,
        contrast=call.contrast, targets=targets, target_args=target_args,
        max_new_tokens=max_new_tokens, chat=chat, system=system, keep_template=keep_template,
        generate_kwargs=generate_kwargs, contrast_targets=contrast_targets,
        contrast_sources=contrast_sources, contrast_targets_alignments=contrast_targets_alignments,
        contrast_force_inputs=contrast_force_inputs, contrast_context=contrast_context,
        groups=groups, skip_special_tokens=skip_special_tokens,
        include_eos_baseline=include_eos_baseline,
        generate_from_target_prefix=generate_from_target_prefix)


def rerun(model: Model, tokenizer: PreTrainedTokenizerBase, out: AttributionTensors) -> AttributionTensors:
    """`attribute` called again with the arguments `out` records (`fnattr.request.arguments`);
    warns when `model` is not the one it names.

    >>> again = rerun(model, tok, fnattr.load("out.safetensors"))   # the same tensors
    """
    import json
    import warnings

    req = json.loads(out.meta.get("request", "{}"))
    if req and req["model"] != request.model_identity(model):
        warnings.warn(f"this result was computed with {req['model']}; rerunning with "
                      f"{request.model_identity(model)}.", UserWarning, stacklevel=2)
    kwargs = request.arguments(out)
    return attribute(model, tokenizer, kwargs.pop("sources"), **kwargs)


def step_slice(out: AttributionTensors, k: int) -> AttributionTensors:
    """Attributed step `k` (an index into `out.steps`) of a result, as a result of that one step:
    `source` [batch 1 src ...], `steps` [1], step scores and `delta` [batch 1]; `meta` as it was."""
    n = len(out.steps)
    if not -n <= k < n:
        raise IndexError(f"step index {k} is outside the {n} attributed steps: use 0..{n - 1}.")
    one = slice(k % n, k % n + 1)
    cut = lambda t: None if t is None else t[:, one]  # noqa: E731
    return out.replace(source=cut(out.source), target=cut(out.target), steps=out.steps[one],
                       step_scores={name: v[:, one] for name, v in out.step_scores.items()},
                       delta=cut(out.delta))


def iter_steps(
    model: Model, batch: Batch, method: str | Callable = defaults.METHOD,
    target_fn: TargetFn | str = defaults.TARGET_FN, *, steps_per_pass: int | None = 1,
    **method_args: Any,
) -> Iterator[AttributionTensors]:
    """Each attributed step's result (`step_slice`) as soon as it is computed, in step order:
    inseq's `output_step_attributions`, for loops that act on a step before the next is done.

    fnattr computes every step in one pass, so streaming has a price, and you choose it:
    `steps_per_pass=n` runs the method on n steps at a time (`attr_pos_start`/`attr_pos_end`
    windows over the range asked for, all of it by default) and yields those n steps before
    computing the next ones, at up to (number of steps / n) times the cost of one pass;
    `steps_per_pass=None` runs the single pass and then yields its steps (no extra cost, no
    result before the end). Deterministic methods give every step the same scores either way
    (a step reads only its prefix); sampling methods draw again in each pass (their seeds apply
    per call). Each result's `meta` describes the pass that computed it.

    >>> for out in iter_steps(model, batch, "saliency", steps_per_pass=1):
    ...     print(int(out.steps[0]), out.source.sum())
    """
    if steps_per_pass is not None and (isinstance(steps_per_pass, bool) or steps_per_pass < 1):
        raise ValueError(f"`steps_per_pass`={steps_per_pass!r}: pass an int >= 1 (that many steps "
                         "per pass), or None (one pass, then each step).")
    fn = get_method(method)
    target = resolve_target(target_fn, model=model, batch=batch, contrast=None, options={},
                            used=set())
    start, end = method_args.pop("attr_pos_start", None), method_args.pop("attr_pos_end", None)
    positions = step_range(batch, start, end).tolist()
    size = steps_per_pass or len(positions)
    for lo in range(0, len(positions), size):
        window = positions[lo:lo + size]
        out = fn(model, batch, target, attr_pos_start=window[0], attr_pos_end=window[-1] + 1,
                 **method_args)
        for k in range(len(window)):
            yield step_slice(out, k)


def compute_step_scores(
    model: Model, batch: Batch, step_scores: StepScoreSpec, *,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
) -> dict[str, Tensor]:
    """Step scores alone `{name: [batch step]}`: one no-grad forward, as methods compute them.

    >>> compute_step_scores(model, batch, ["entropy", fnattr.targets.perplexity])
    """
    if not step_scores:
        raise ValueError("`step_scores` is empty: name at least one function, e.g. ['entropy'].")
    with attribution_context(model, batch, attribute_target=None, attr_pos_start=attr_pos_start,
                             attr_pos_end=attr_pos_end) as ctx, torch.no_grad():
        logits = clean_logits(ctx)
        return {name: score_steps(fn, logits, ctx.batch, ctx.steps).cpu()
                for name, fn in resolve_step_scores(step_scores).items()}

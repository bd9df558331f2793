"""Compare attribution methods by faithfulness on the same examples.

`compare_methods` prepares one batch (sources with forced targets, or generated ones), attributes
it with every method and scores each result with `fnattr.evaluate.faithfulness` under the same
removal, fractions, curve levels and random rankings. Per method and metric it keeps each
example's area (AOPC for comprehensiveness and sufficiency, AUC for the deletion and insertion
curves, averaged over the example's generated steps: `Faithfulness.per_example`), the random
rankings' area (chance), their mean and a 95 % percentile-bootstrap interval over examples (the
same seeded resamples for every method and metric: paired), and a ranking per metric
(`fnattr.evaluate.HIGHER_IS_BETTER` says which way is better).

>>> comp = compare_methods(model, tok, ["The capital of France is"], ["saliency", "occlusion"])
>>> comp.ranking["comprehensiveness"]; console(comp); comp.save("out"); plot_curves(comp, "c.png")
"""
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from transformers import PreTrainedTokenizerBase

from fnattr import defaults
from fnattr.evaluate import metrics as ev
from fnattr.evaluate.compare_result import JSONL as JSONL
from fnattr.evaluate.compare_result import RESULT as RESULT
from fnattr.evaluate.compare_result import _header, _write_jsonl, _write_result
from fnattr.evaluate.compare_result import check_outputs as check_outputs
from fnattr.evaluate.compare_result import load as load
from fnattr.evaluate.compare_result import output_paths as output_paths
from fnattr.evaluate.compare_result import save as save
from fnattr.evaluate.compare_result import LEVEL as LEVEL
from fnattr.evaluate.compare_result import Comparison as Comparison
from fnattr.evaluate.compare_result import Estimate as Estimate
from fnattr.evaluate.compare_result import _build, _faith_meta
from fnattr.evaluate.compare_result import bootstrap as bootstrap
from fnattr.evaluate.compare_views import console as console
from fnattr.evaluate.compare_views import plot_curves as plot_curves
from fnattr.evaluate.compare_views import table as table
from fnattr.evaluate.shared import faithfulness_many
from fnattr.batch import Batch, prepare
from fnattr.dataset.readers import Example
from fnattr.methods import METHODS
from fnattr.attribution import fn_name
from fnattr.targets import TARGETS
from fnattr.types import Model, TargetFn

# ---- checks before anything runs ------------------------------------------------------------

def _methods(methods: Sequence[str | Callable], options: Mapping[str, Mapping[str, Any]] | None,
             ) -> dict[str, tuple[Callable, dict[str, Any]]]:
    """{name: (method, its options)}, every name, option and file name checked."""
    plan: dict[str, tuple[Callable, dict[str, Any]]] = {}
    for spec in [methods] if isinstance(methods, str) or callable(methods) else methods:
        if isinstance(spec, str) and spec not in METHODS:
            raise ValueError(f"method {spec!r} is unknown: use one of {', '.join(sorted(METHODS))}.")
        fn = METHODS[spec] if isinstance(spec, str) else spec
        name = spec if isinstance(spec, str) else getattr(fn, "__name__", "")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name in plan:
            raise ValueError(f"method name {name!r} is " + ("given twice" if name in plan else
                             "not a plain file name") + ": each method needs its own name "
                             "(set the function's __name__).")
        plan[name] = (fn, {})
    if not plan:
        raise ValueError("`methods` is empty: name at least one, e.g. ['saliency', 'occlusion'].")
    for name, opts in (options or {}).items():
        if name not in plan:
            raise ValueError(f"`method_options` names {name!r}, which is not among the methods "
                             f"{list(plan)}.")
        params = inspect.signature(plan[name][0]).parameters
        allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "step_scores"]
        if unknown := [k for k in opts if k not in allowed]:
            raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}: "
                             f"its options are {', '.join(allowed) or 'none'}.")
        plan[name] = (plan[name][0], dict(opts))
    return plan


def _faithfulness_options(metrics: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(ev.faithfulness).parameters
    allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p not in ("metrics", "seed")]
    if unknown := [k for k in options if k not in allowed]:
        raise ValueError(f"unknown option {', '.join(map(repr, unknown))}: compare_methods passes "
                         f"{', '.join(allowed)} to fnattr.evaluate.faithfulness.")
    full = {p: options.get(p, params[p].default) for p in allowed}
    ev._check_options(metrics, full["fractions"], full["curve_levels"], full["removal"],
                      full["ranking"], full["sign"], full["n_random"], full["internal_batch_size"])
    return dict(options)


def _texts(examples: Sequence[str | Example | tuple[str, str | None]]):
    """(sources, targets or None) of `examples`."""
    pairs = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            pairs.append((ex, None))
        elif isinstance(ex, Example):
            pairs.append((ex.text, ex.target))
        elif isinstance(ex, tuple) and len(ex) == 2:
            pairs.append(ex)
        else:
            raise TypeError(f"`examples[{i}]` is {type(ex).__name__}: pass a text, a (source, "
                            "target) pair or a fnattr.dataset.Example.")
    forced = sum(t is not None for _, t in pairs)
    if 0 < forced < len(pairs):
        raise ValueError(f"{forced} of {len(pairs)} examples have a target: force a target for "
                         "every example, or for none (then they are generated).")
    return [s for s, _ in pairs], [t for _, t in pairs] if forced else None


# ---- the comparison -------------------------------------------------------------------------

@contextmanager
def _phase(console, message: str) -> Iterator[None]:
    """A status line on stderr while the work runs, and how long it took after it."""
    if console is None:
        yield
        return
    from rich.text import Text

    start = time.perf_counter()
    with console.status(Text(message)):
        yield
    console.print(Text(f"{message}: done in {time.perf_counter() - start:.1f} s", style="dim"))


def compare_methods(
    model: Model, tokenizer: PreTrainedTokenizerBase | None,
    examples: Batch | Sequence[str | Example | tuple[str, str | None]],
    methods: Sequence[str | Callable], *, target_fn: str | TargetFn = defaults.TARGET_FN,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] = ev.METRICS, max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    n_boot: int = 1000, seed: int = 0, progress: bool = False,
    out_dir: str | os.PathLike | None = None, overwrite: bool = False, **faithfulness_options: Any,
) -> Comparison:
    """Attribute the same examples with every method in `methods` (names from
    `fnattr.methods.METHODS`, or functions) and compare their faithfulness.

    `examples`: texts (targets generated, `max_new_tokens`), (source, target) pairs or
    `fnattr.dataset.Example`s (targets forced), or a prepared `Batch`; the batch is prepared
    once and every method runs on it. `method_options`: `{method: {option: value}}`.
    `target_fn`: a name from `fnattr.targets.TARGETS` or a function, for the methods and the
    scores. `faithfulness_options` (`fractions`, `curve_levels`, `removal`, `ranking`, `sign`,
    `reduction`, `n_random`, `internal_batch_size`) go to `fnattr.evaluate.faithfulness`, the same
    for every method. `seed` seeds its random rankings and the `n_boot` bootstrap resamples
    (local generators). `progress`: status lines on stderr. `out_dir`: write each method's
    result as soon as it exists, and the JSONL at the end (`save`; checked before anything runs).

    >>> comp = compare_methods(model, tok, [("The capital of France is", " Paris")],
    ...                        ["saliency", "occlusion"], fractions=(0.1, 0.2), n_random=10)
    >>> comp.estimates["saliency"]["comprehensiveness"]   # Estimate(mean=..., low=..., high=...)
    """
    plan = _methods(methods, method_options)
    fn = target_fn if callable(target_fn) else TARGETS.get(target_fn)
    if fn is None:
        raise ValueError(f"`target_fn`={target_fn!r} is unknown: use one of {sorted(TARGETS)} or "
                         "pass a function.")
    metrics = tuple(metrics)
    options = _faithfulness_options(metrics, faithfulness_options)
    for name, value, low in (("n_boot", n_boot, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}`={value!r}: it must be an integer of at least {low}.")
    if out_dir is not None:
        check_outputs(output_paths(out_dir, list(plan)), overwrite=overwrite)
    console = None
    if progress:
        from rich.console import Console
        console = Console(stderr=True)
    how = "from the batch"
    if not isinstance(examples, Batch):
        sources, targets = _texts(examples)
        how = "forced" if targets is not None else f"generated (greedy, at most {max_new_tokens} tokens)"
        with _phase(console, f"preparing {len(sources)} examples"):
            examples = prepare(model, tokenizer, sources, targets, max_new_tokens=max_new_tokens)
    batch, results = examples, {}
    meta = {"target_fn": fn_name(fn), "targets": how,
            "options": json.loads(json.dumps({**options, "seed": seed}, default=repr))}
    files = dict(zip(plan, output_paths(out_dir, list(plan))[1:])) if out_dir is not None else {}
    outs = {}
    for name, (method, opts) in plan.items():
        with _phase(console, f"attributing with {name}"):
            outs[name] = method(model, batch, fn, **opts)
    # every method's removal copies and the random rankings' in the same forwards, each once
    with _phase(console, f"scoring {', '.join(plan)}" if len(plan) > 1 else f"scoring {name}"):
        results = faithfulness_many(model, batch, outs, fn, metrics=metrics, seed=seed, **options)
    for name in plan:
        if name in files:
            header = _header(list(plan), range(len(batch)), n_boot, seed, meta)
            _write_result(results[name], files[name], header)
    comp = _build(results, ids=range(len(batch)), sources=batch.sources, targets=batch.targets,
                  n_boot=n_boot, seed=seed, meta={**meta, **_faith_meta(results)})
    if out_dir is not None:
        _write_jsonl(comp, output_paths(out_dir, [])[0])
    return comp

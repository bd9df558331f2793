"""The `fnattr` command line: `attribute`, `attribute-dataset`, `show`, `evaluate`, `report`,
`attribute-context`, `methods`.

Everything cheap is checked before anything expensive. Method names, option values (type-checked
against the methods' signatures), target functions, input files and output paths are checked
before torch is imported and before a model loads: this module imports only the standard library,
and reads fnattr's tables and signatures from its source files (`ast`, no torch). `--help`,
`--version`, `fnattr methods` and argument errors answer in a fraction of a second.

Errors print one line (no traceback unless `--debug`) and exit with status 1 (2 for bad usage);
Ctrl-C prints one line and exits with status 130. Each output file is written on its own (a
failed one is reported and the others are still written), atomically, and never over an existing
file unless `--overwrite`.
"""


import argparse
import functools
import itertools
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fnattr import defaults
from fnattr.cli.catalog import (  # noqa: F401 - the command line's public helpers live here too
    COMMON, FIXED, MethodInfo, Option, UsageError, check_options, coerce, constant, json_part,
    method_info, method_names, method_options, methods_text, runtime_spec, spec_text, table_names,
)
from fnattr.cli.catalog import _json_value
from fnattr.cli.outputs import (  # noqa: F401
    SAVE_PATTERN, _render_jobs, _table, check_groups, check_outputs, default_save, group_by,
    png_paths, print_citations, write_output, write_outputs,
)


# ---- cheap checks of the other arguments --------------------------------------------------------

def _check_positive(**values: int | None) -> None:
    for flag, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: it must be at least 1.")


def _check_target_fns(target_fn: str, step_scores: Sequence[str], *, contrast: bool) -> set[str]:
    """Names of target functions; returns the contrastive ones used (`contrast`: allowed)."""
    plain = table_names("fnattr.targets", "TARGETS")
    contrastive = table_names("fnattr.targets", "CONTRAST_TARGETS")
    by_model = table_names("fnattr.targets", "MODEL_TARGETS")
    known = plain + contrastive + by_model if contrast else plain
    for flag, name in (("--target-fn", target_fn), *(("--step-scores", s) for s in step_scores)):
        if name not in known:
            where = (" needs a contrastive input or the model, which only `fnattr attribute` passes"
                     if name in contrastive + by_model else " is unknown")
            raise UsageError(f"{flag} {name!r}{where}: use one of {', '.join(known)}.")
    return {n for n in (target_fn, *step_scores) if n in contrastive}


def _check_dtype(dtype: str | None) -> None:
    dtypes = table_names("fnattr.loading", "_DTYPES")
    if dtype is not None and dtype.removeprefix("torch.").lower() not in dtypes:
        raise UsageError(f"--dtype {dtype!r} is unknown: use one of {', '.join(dtypes)}.")


def _check_model(model: str | None) -> None:
    """A --model that is plainly a path must exist (hub ids are left to the loader)."""
    path = os.path.expanduser(model or "")
    if model and (model.endswith(".gguf") or os.path.isabs(path) or model.startswith((".", "~"))) \
            and not os.path.exists(path):
        raise FileNotFoundError(f"--model {model!r} could not be loaded: no such file or folder.")


INPUTS = constant("fnattr.dataset.readers", "FORMATS")  # the formats `dataset.read_examples` reads


def _check_input(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path!r} does not exist: pass {INPUTS}.")


def _device_map(value: str | None) -> str | dict | None:
    """--device-map: auto, balanced, sequential, or a JSON object {module: device}."""
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    parsed = _json_value(value)
    if not isinstance(parsed, dict) or not parsed:
        raise UsageError(f"--device-map {value!r}: write auto, balanced, sequential, or a JSON object "
                         'of module name to device, e.g. \'{"model.embed_tokens": 0, "lm_head": "cpu"}\'.')
    return parsed


def _check_loading(args: argparse.Namespace) -> None:
    """How every command that loads a model loads it: --dtype and --device-map (the --model
    path is checked by `_check_model`, each command at its own place)."""
    _check_dtype(args.dtype)
    _device_map(args.device_map)


def _check_device(device: str) -> None:
    """After torch is imported, before the model loads."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {device!r} is not a device ({error}): e.g. cpu, cuda, cuda:1.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available here; use --device cpu.")


# ---- commands -----------------------------------------------------------------------------------

def _logger(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def load(model: str | None, *, dtype: str | None, device: str, trust_remote_code: bool = False,
         device_map: str | dict | None = None, offload_folder: str | None = None):
    """`fnattr.load_model`, with any failure turned into one clear line."""
    from transformers.utils import logging as hf_logging

    from fnattr.loading import load_model

    hf_logging.disable_progress_bar()
    try:
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                          device_map=device_map, offload_folder=offload_folder)
    except Exception as error:  # every loading failure gets the same message shape
        what = "the default model" if model is None else f"--model {model!r}"
        raise RuntimeError(f"{what} could not be loaded: {error}") from error


def _text_checks(args: argparse.Namespace, contrastive: set[str]) -> None:
    """One --target, --contrast-target, --contrast-source per text; contrastive texts with a
    contrastive target function (`contrastive`: the ones used) and only with one."""
    given = [f for f, v in (("--contrast-target", args.contrast_target),
                            ("--contrast-source", args.contrast_source)) if v]
    if contrastive and not given:
        raise UsageError(f"{', '.join(sorted(contrastive))} compares with a contrastive input: add "
                         "--contrast-target TEXT (one per text) and/or --contrast-source TEXT.")
    if given and not contrastive:
        names = table_names("fnattr.targets", "CONTRAST_TARGETS")
        raise UsageError(f"{' and '.join(given)} need a contrastive --target-fn: one of {', '.join(names)}.")
    for flag, texts in (("--target", args.target), ("--contrast-target", args.contrast_target),
                        ("--contrast-source", args.contrast_source)):
        if texts is not None and len(texts) != len(args.text):
            raise UsageError(f"{len(texts)} {flag} for {len(args.text)} texts: give one {flag} per "
                             "text" + (", or none to generate." if flag == "--target" else "."))
    if args.contrast_force_inputs and not given:
        raise UsageError("--contrast-force-inputs attributes on the contrastive inputs: add "
                         "--contrast-target and/or --contrast-source with a contrastive --target-fn.")
    if args.contrast_force_inputs and args.contrast_target and args.contrast_context == "same":
        raise UsageError("--contrast-force-inputs attributes on the contrast's own input, where each "
                         "--contrast-target token is scored under its own prefix: add "
                         "--contrast-context own.")
    if args.generate_from_target_prefix and not args.target:
        raise UsageError("--generate-from-target-prefix continues each --target: add --target TEXT.")
    if args.contrast_alignments is not None:
        if not args.contrast_target:
            raise UsageError("--contrast-alignments aligns --contrast-target texts: add them.")
        value = _json_value(args.contrast_alignments)
        if value != "auto" and not isinstance(value, list):
            raise UsageError(f"--contrast-alignments {args.contrast_alignments!r}: write auto, or "
                             "JSON (target position, contrast position) pairs, e.g. [[0, 0], [1, 2]].")
        args.contrast_alignments = value


def _attribute_checks(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Everything `fnattr attribute` can check before torch loads; returns the method options."""
    opts = check_options(args.method, method_options(args.arg, rest))
    _text_checks(args, _check_target_fns(args.target_fn, args.step_scores, contrast=True))
    _check_positive(max_new_tokens=args.max_new_tokens)
    _check_chat(args)
    check_groups(args)
    _check_loading(args)
    _check_model(args.model)
    if args.save is None and not args.no_save:
        args.save = default_save()
    outputs = [("--save", args.save)] if args.save and not args.no_save else []
    outputs += [("--html", args.html)] if args.html else []
    outputs += [("--png", p) for p in png_paths(args.png, len(args.text))] if args.png else []
    check_outputs(outputs, overwrite=args.overwrite)
    if "progress" in {o.name for o in method_info(args.method).options}:
        opts.setdefault("progress", not args.quiet)
    return opts


def cmd_attribute(args: argparse.Namespace, rest: list[str]) -> int:
    opts = _attribute_checks(args, rest)
    log, start = _logger(args), time.perf_counter()
    from fnattr.api import prepare_call
    from fnattr.methods import METHODS

    _check_device(args.device)
    model, tokenizer = load(args.model, **_loading(args))
    call = prepare_call(model, tokenizer, args.text, args.target, target_fn=args.target_fn,
                        step_scores=args.step_scores, contrast_targets=args.contrast_target or None,
                        contrast_sources=args.contrast_source or None,
                        contrast_targets_alignments=args.contrast_alignments,
                        contrast_force_inputs=args.contrast_force_inputs,
                        contrast_context=args.contrast_context,
                        max_new_tokens=args.max_new_tokens, groups=group_by(args), **_prompt(args))
    batch = call.batch
    out = METHODS[args.method](model, batch, call.target_fn, step_scores=call.step_scores, **opts)
    from fnattr import request

    out = request.record(  # what `fnattr.attribute` would be called with (meta["request"])
        out, model=model, sources=args.text, method=args.method, target_fn=args.target_fn,
        method_args={**opts, "step_scores": list(args.step_scores)}, contrast=call.contrast,
        targets=args.target, max_new_tokens=args.max_new_tokens,
        contrast_targets=args.contrast_target, contrast_sources=args.contrast_source,
        contrast_targets_alignments=args.contrast_alignments,
        contrast_force_inputs=args.contrast_force_inputs, contrast_context=args.contrast_context,
        groups=group_by(args), **_prompt(args))
    for src, tgt in zip(batch.sources, batch.targets):
        print(f"{src}\u2192{tgt}" if args.quiet else f"{src} \u2192 {tgt!r}")
    write = functools.partial(write_outputs, overwrite=args.overwrite, command=args.command,
                              debug=args.debug, log=log)
    failed = write([("--save", args.save, out.save)] if args.save and not args.no_save else [])
    failed += _table(out, args)
    failed += print_citations(out, args)
    failed += write(_render_jobs(out, args, png_paths(args.png, len(args.text)) if args.png else []))
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def cmd_show(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r} for `fnattr show`.")
    _check_positive(limit=args.limit)
    check_groups(args)
    if os.path.isdir(args.file):
        return _show_run(args)
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"{args.file!r} does not exist: pass a .safetensors file written by "
                                "`fnattr attribute --save` or `AttributionTensors.save`, or the "
                                "--out folder of `fnattr attribute-dataset`.")
    check_outputs([("--html", args.html)] if args.html else [], overwrite=args.overwrite)
    from fnattr.result import load as load_result

    out = load_result(args.file)
    pngs = png_paths(args.png, out.source.shape[0]) if args.png else []
    check_outputs([("--png", p) for p in pngs], overwrite=args.overwrite)
    failed = _table(out, args)
    failed += print_citations(out, args)
    from fnattr.request import describe

    if not args.no_table and (asked := describe(out.meta)):
        print(asked)
    failed += write_outputs(_render_jobs(out, args, pngs), overwrite=args.overwrite,
                            command=args.command, debug=args.debug, log=_logger(args))
    return 1 if failed else 0


def _show_run(args: argparse.Namespace) -> int:
    """`fnattr show DIR`: a dataset run's summary, then the first --limit examples' tables."""
    for flag, value in (("--html", args.html), ("--png", args.png)):
        if value:
            raise UsageError(f"{flag} renders one result file, and {args.file!r} is a dataset run: "
                             f"pass one of its shards, e.g. {os.path.join(args.file, 'shard-00000.safetensors')!r}.")
    from fnattr import dataset

    if args.no_table:
        print(dataset.describe(args.file))
    else:
        dataset.show(args.file, limit=args.limit, reduction=args.reduce, normalize=args.normalize)
    return 0


def _loading(args: argparse.Namespace) -> dict[str, Any]:
    """`load_model`'s keywords from the command line (the model itself apart)."""
    return {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code,
            "device_map": _device_map(args.device_map), "offload_folder": args.offload_folder}


def _on_ray(args: argparse.Namespace) -> bool:
    return args.workers is not None or args.ray_address is not None


def _dataset_on_ray(args: argparse.Namespace, run: dict[str, Any]) -> int:
    """`attribute-dataset --workers N [--ray-address ADDR]`: `fnattr.distributed.run`. The driver
    checks every row and never loads the model; each Ray actor loads it once."""
    try:
        from fnattr.dataset import distributed
    except ImportError as error:
        raise ImportError(f"--workers/--ray-address run on Ray, which is not installed ({error}): "
                          'pip install "fnattr[ray]".') from None
    distributed.check_address(args.ray_address)
    spec = distributed.ModelSpec(args.model, dtype=args.dtype,
                                 device=None if args.gpus_per_worker else args.device,
                                 device_map=_device_map(args.device_map),
                                 offload_folder=args.offload_folder,
                                 trust_remote_code=args.trust_remote_code)
    return distributed.run(args.input, spec, run.pop("method"), **run, workers=args.workers or 2,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                           address=args.ray_address)


def cmd_dataset(args: argparse.Namespace, rest: list[str]) -> int:
    opts = check_options(args.method, method_options(args.arg, rest))
    _check_target_fns(args.target_fn, args.step_scores, contrast=False)
    _check_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    workers=args.workers)
    if args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise UsageError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0.")
    if not _on_ray(args) and (args.gpus_per_worker or args.cpus_per_worker != 1):
        raise UsageError("--gpus-per-worker/--cpus-per-worker size Ray workers: add --workers N.")
    _check_chat(args)
    _check_loading(args)
    _check_input(args.input)
    _check_model(args.model)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file: name a folder for the shards.")
    log = _logger(args)
    from fnattr import dataset
    from fnattr.methods import METHODS
    from fnattr.targets import TARGETS

    fields = {"text_field": args.text_field, "target_field": args.target_field,
              "id_field": args.id_field, "on_bad_row": args.on_bad_row}
    # what the shards depend on (resume refuses a change); how bad rows are handled is not
    config = {"input": os.path.abspath(args.input), "text_field": args.text_field,
              "target_field": args.target_field, "model": args.model,
              **({"id_field": args.id_field} if args.id_field else {})}
    run = {"method": METHODS[args.method], "out_dir": args.out, "target_fn": TARGETS[args.target_fn],
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "step_scores": tuple(args.step_scores), "method_args": opts, "config": config,
           "progress": not args.quiet, "reduce": args.reduce, **_chat(args)}
    if _on_ray(args):
        done = _dataset_on_ray(args, {**run, **fields})
        log(f"{done} examples in {args.out}")
        return 0
    examples = dataset.read_examples(args.input, **fields)
    total = dataset.count_examples(args.input, **fields)  # every row checked before loading
    _check_device(args.device)
    model, tokenizer = load(args.model, **_loading(args))
    done = dataset.run(model, tokenizer, examples, run.pop("method"), total=total,
                       command=shlex.join(["fnattr", *args.argv]), **run)
    log(f"{done} examples in {args.out}" + (f"; {len(examples.skipped)} bad rows skipped "
                                             f"(listed in {os.path.join(args.out, dataset.RUN_FILE)})"
                                             if examples.skipped else ""))
    return 0


def _evaluate_method_args(pairs: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--arg method.key=value` pairs, grouped by method (values as `method_options` reads them)."""
    grouped: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        method, dot, option = key.partition(".")
        if not (sep and dot and method and option):
            raise UsageError(f"`--arg {pair}` is not method.key=value: write e.g. "
                             "`--arg integrated_gradients.n_steps=16`.")
        if method not in names:
            raise UsageError(f"`--arg {pair}` is for {method!r}, which --methods does not list "
                             f"({', '.join(names)}).")
        grouped.setdefault(method, []).append(pair.partition(".")[2])
    return {m: check_options(m, method_options(p, [])) for m, p in grouped.items()}


def _evaluate_checks(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Everything `fnattr evaluate` can check before torch loads: names, values, paths."""
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r}: method options are "
                         "`--arg method.key=value`.")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names or len(set(names)) < len(names):
        raise UsageError(f"--methods {args.methods!r}: list distinct method names, comma-separated.")
    if unknown := [n for n in names if n not in method_names()]:
        raise UsageError(f"--methods: {', '.join(map(repr, unknown))} unknown: use "
                         f"{', '.join(method_names())}.")
    options = _evaluate_method_args(args.arg, names)
    try:
        fractions = tuple(float(q) for q in args.fractions.split(","))
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < q <= 1 for q in fractions):
        raise UsageError(f"--fractions {args.fractions!r}: write numbers in (0, 1], e.g. 0.05,0.1,0.2.")
    for flag, value, table in (("--removal", args.removal, ("fnattr.evaluate", "REMOVALS")),
                               ("--rank-by", args.rank_by, ("fnattr.evaluate", "METRICS"))):
        if value not in (allowed := table_names(*table)):
            raise UsageError(f"{flag} {value!r} is unknown: use one of {', '.join(allowed)}.")
    _check_positive(max_new_tokens=args.max_new_tokens, limit=args.limit, n_boot=args.n_boot,
                    curve_levels=args.curve_levels)
    if args.png is not None and not args.png.lower().endswith(".png"):
        raise UsageError(f"--png {args.png!r}: name a .png file.")
    _check_target_fns(args.target_fn, (), contrast=False)
    _check_loading(args)
    _check_input(args.input)
    return {"methods": names, "method_options": options, "target_fn": args.target_fn,
            "fractions": fractions, "removal": args.removal, "n_random": args.n_random,
            "curve_levels": args.curve_levels}


def cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    run = _evaluate_checks(args, rest)
    from fnattr import dataset
    from fnattr.evaluate import compare
    from fnattr.evaluate import METRICS

    faith = {k: run[k] for k in ("fractions", "removal", "n_random", "curve_levels")}
    compare._faithfulness_options(METRICS, faith)
    compare.check_outputs(compare.output_paths(args.out, run["methods"]) + ([args.png] if args.png else []),
                          overwrite=args.overwrite)
    try:
        rows = dataset.read_examples(args.input, text_field=args.text_field,
                                     target_field=args.target_field, on_bad_row=args.on_bad_row)
        examples = list(itertools.islice(rows, args.limit))
    except ValueError as error:
        raise ValueError(str(error)) from None
    log = _logger(args)
    if rows.skipped:
        log(f"skipped {len(rows.skipped)} bad rows: "
            + ", ".join(f"line {b.line}" for b in rows.skipped[:10]) + (" ..." if len(rows.skipped) > 10 else ""))
    start = time.perf_counter()
    _check_model(args.model)
    _check_device(args.device)
    log(f"loading {args.model or 'the default model'}")
    model, tokenizer = load(args.model, **_loading(args))
    comparison = compare.compare_methods(
        model, tokenizer, examples, max_new_tokens=args.max_new_tokens, n_boot=args.n_boot,
        seed=args.seed, progress=not args.quiet, out_dir=args.out, overwrite=args.overwrite, **run)
    compare.console(comparison, by=args.rank_by)
    for path in compare.output_paths(args.out, comparison.methods):
        log(f"wrote {path}")
    if args.png:
        compare.plot_curves(comparison, args.png, overwrite=args.overwrite)
        log(f"wrote {args.png}")
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    """`fnattr report PATH...`: the interactive HTML report (`fnattr.report`)."""
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r} for `fnattr report`.")
    for path in args.paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} does not exist: pass a result file (.safetensors), a "
                                    "dataset run folder or an `fnattr evaluate` folder.")
    check_outputs([("--out", args.out)], overwrite=args.overwrite)
    from fnattr.report.command import run

    return run(args.paths, args.out, reduction=args.reduce, normalize=args.normalize,
               title=args.title, log=_logger(args))


def cmd_methods(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r} for `fnattr methods`.")
    if unknown := [n for n in args.names if n not in method_names()]:
        raise UsageError(f"{', '.join(map(repr, unknown))} is not a method: use one of "
                         f"{', '.join(method_names())}.")
    print(methods_text(args.names))
    return 0


# ---- the parser ---------------------------------------------------------------------------------

class _Methods(argparse.Action):
    """`--method NAME`; `--method help` lists the methods and exits, as `--help` does."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == "help":
            print(methods_text())
            parser.exit(0)
        setattr(namespace, self.dest, values)


class _Version(argparse.Action):
    """`--version`, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("fnattr")
        except PackageNotFoundError:
            text = "(not installed)"
        print(f"fnattr {text}")
        parser.exit(0)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, model folder or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--device-map", default=None, metavar="auto|JSON",
                   help="spread a model too large for one device over the GPUs, then CPU, then disk "
                        "(accelerate): auto, balanced, sequential, or JSON {module: device}")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where layers that fit nowhere else go")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's or hub repository's own Python code (`auto_map` in "
                        "its config); only for code you have read (default: refused)")
    p.add_argument("--quiet", action="store_true", help="no progress or status messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _method_options(p: argparse.ArgumentParser, *, contrast: bool) -> None:
    targets = table_names("fnattr.targets", "TARGETS")
    if contrast:
        targets += table_names("fnattr.targets", "CONTRAST_TARGETS") + table_names("fnattr.targets",
                                                                                     "MODEL_TARGETS")
    p.add_argument("--method", default=defaults.METHOD, metavar="NAME", action=_Methods,
                   help=f"one of {', '.join(method_names())} (default {defaults.METHOD}, refined "
                        "until complete to 5%%); `fnattr methods` or `--method help` lists their "
                        "options and defaults")
    p.add_argument("--target-fn", default=defaults.TARGET_FN, metavar="NAME",
                   help=f"what is attributed: {', '.join(targets)} (default {defaults.TARGET_FN})")
    p.add_argument("--step-scores", nargs="*", default=[], metavar="NAME",
                   help="extra per-step scores to record (same names as --target-fn)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=f"tokens to generate without --target (default {defaults.MAX_NEW_TOKENS})")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, VALUE as JSON, e.g. --arg n_steps=16; `--n-steps 16` "
                        "works as well")
    _model_options(p)


def _chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat", action="store_true",
                   help="write each text as the user's turn of the tokenizer's chat template (for "
                        "instruct models); the template's own tokens are not attributed")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system turn before each text")
    p.add_argument("--keep-template", action="store_true",
                   help="with --chat: attribute the template's tokens (role headers, markers) too")


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-special-tokens", action="store_true",
                   help="leave the special tokens the tokenizer adds (BOS, ...) out of the source, "
                        "keeping a closing EOS")
    p.add_argument("--include-eos-baseline", action="store_true",
                   help="attribute a source EOS as an ordinary token (default: it keeps its "
                        "embedding and scores 0)")


def _check_chat(args: argparse.Namespace) -> None:
    if not args.chat and (args.system is not None or args.keep_template):
        flag = "--system" if args.system is not None else "--keep-template"
        raise UsageError(f"{flag} applies to chat prompts: add --chat.")
    if args.chat and getattr(args, "contrast_source", None):
        raise UsageError("--contrast-source with --chat: contrastive sources are not written into "
                         "the chat template; render both prompts yourself and drop --chat.")


def _chat(args: argparse.Namespace) -> dict[str, Any]:
    """`prepare`'s chat keywords from the command line."""
    return {"chat": args.chat, "system": args.system, "keep_template": args.keep_template}


def _prompt(args: argparse.Namespace) -> dict[str, Any]:
    """All of `prepare`'s prompt keywords that `fnattr attribute` takes."""
    return {**_chat(args), "skip_special_tokens": args.skip_special_tokens,
            "include_eos_baseline": args.include_eos_baseline,
            "generate_from_target_prefix": args.generate_from_target_prefix}


def _view_options(p: argparse.ArgumentParser) -> None:
    reducers = table_names("fnattr.aggregate", "REDUCERS")
    p.add_argument("--reduce", default=None, choices=reducers, metavar="HOW",
                   help="how the table, HTML and PNG reduce the extra dims (hidden, layer, head) "
                        f"to one score per token: {', '.join(reducers)} (default: by "
                        "method: L2 norm for saliency, sum for additive methods such as IG, mean "
                        "for attention)")
    p.add_argument("--normalize", action="store_true",
                   help="divide each step's column by the sum of its absolute scores, so that "
                        "columns compare (the saved result is not changed)")
    splitters = table_names("fnattr.groups", "SPLITTERS")
    p.add_argument("--group-by", default=None, choices=splitters, metavar="NAME",
                   help=f"one row per source group: {', '.join(splitters)} (attribute: the "
                        "perturbation methods perturb whole groups; the sum of a group's token "
                        "scores, or their L2 norm for gradient magnitudes); also prints, for each "
                        "generated sentence, its top groups")
    p.add_argument("--group-separator", default=None, metavar="TEXT",
                   help="with --group-by documents: the text between documents (default a blank "
                        "line; escapes such as \\n are read)")
    p.add_argument("--citations", type=int, default=None, metavar="K",
                   help="with --group-by: cite the top K groups per generated sentence (default 3)")
    p.add_argument("--show-template", action="store_true",
                   help="with --chat: show the chat template's tokens (hidden by default: they "
                        "are never attributed)")
    p.add_argument("--html", default=None, metavar="PATH", help="write a standalone HTML heatmap")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="write a PNG heatmap (for several texts: PATH-0.png, PATH-1.png, ...)")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _attribute_parser(sub) -> None:
    att = sub.add_parser("attribute", help="attribute the generation of one or more texts",
                         description="Attribute what a model generates for each TEXT (or the forced "
                         "--target texts) to the tokens it read, print a table, save the result.")
    att.add_argument("text", nargs="+", help="the source texts, each in quotes, before the options")
    att.add_argument("--target", nargs="+", action="extend", default=None, metavar="TEXT",
                     help="force these targets (one per text, in order) instead of generating: "
                          '--target " Paris." " Rome."')
    att.add_argument("--contrast-target", nargs="+", action="extend", default=None, metavar="TEXT",
                     help="contrastive targets, one per text (\"why the target rather than this?\"), "
                          "with a contrastive --target-fn such as contrast_prob_diff")
    att.add_argument("--contrast-source", nargs="+", action="extend", default=None, metavar="TEXT",
                     help="contrastive sources, one per text, with a contrastive --target-fn")
    att.add_argument("--contrast-force-inputs", action="store_true",
                     help="attribute on the contrastive inputs (--contrast-target/--contrast-source) "
                          "instead of the original ones")
    att.add_argument("--generate-from-target-prefix", action="store_true",
                     help="treat each --target as a prefix and let the model continue it "
                          "(up to --max-new-tokens)")
    att.add_argument("--contrast-alignments", default=None, metavar="auto|JSON",
                     help="align target with --contrast-target positions: auto (by tokens) or "
                          "[[target position, contrast position], ...] (default: position by position "
                          "from the end, as inseq)")
    att.add_argument("--contrast-context", default="same", choices=("same", "own"),
                     help="the prefix a --contrast-target token is scored under: same (the attributed "
                          "target's, as Yin & Neubig 2022 and inseq; default) or own (the contrast's)")
    _method_options(att, contrast=True)
    _chat_options(att)
    _source_options(att)
    att.add_argument("--save", default=None, metavar="PATH",
                     help="result file (default: a new " + SAVE_PATTERN.format(stamp="YYYYmmdd-HHMMSS")
                          + " in the current folder)")
    att.add_argument("--no-save", action="store_true", help="do not save the result")
    _view_options(att)
    att.set_defaults(run=cmd_attribute)


def _evaluate_parser(sub) -> None:
    fractions = ",".join(f"{q:g}" for q in table_names("fnattr.evaluate", "FRACTIONS"))
    metrics, removals = table_names("fnattr.evaluate", "METRICS"), table_names("fnattr.evaluate", "REMOVALS")
    ev = sub.add_parser("evaluate", help="compare methods by faithfulness on a .jsonl/.csv file")
    ev.add_argument("--methods", required=True, metavar="A,B,...", action=_Methods,
                    help=f"comma-separated method names: {', '.join(method_names())} "
                         "(`--methods help` lists their options)")
    ev.add_argument("--input", required=True, help=INPUTS)
    ev.add_argument("--text-field", "--source-field", dest="text_field", default="text",
                    help="the field with the source text (default text; --source-field is an alias)")
    ev.add_argument("--target-field", default=None, help="a field with forced targets (default: generate)")
    ev.add_argument("--out", default="fnattr-evaluate", metavar="DIR",
                    help="folder for per_example.jsonl and <method>.faithfulness.safetensors "
                         "(default fnattr-evaluate)")
    ev.add_argument("--target-fn", default=defaults.TARGET_FN, metavar="NAME",
                    help=f"one of {', '.join(table_names('fnattr.targets', 'TARGETS'))} "
                         f"(default {defaults.TARGET_FN})")
    ev.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS)
    ev.add_argument("--arg", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a method option (JSON value), e.g. --arg integrated_gradients.n_steps=16")
    ev.add_argument("--removal", default="auto",
                    help=f"how a token is removed: {', '.join(removals)} (default auto: the methods' "
                         "neutral baseline; mask: dropped from the attention mask)")
    ev.add_argument("--fractions", default=fractions,
                    help=f"comprehensiveness and sufficiency fractions (default {fractions})")
    ev.add_argument("--curve-levels", type=int, default=10, help="deletion/insertion levels (default 10)")
    ev.add_argument("--n-random", type=int, default=5, help="random rankings for chance (default 5)")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ev.add_argument("--seed", type=int, default=0, help="seeds random rankings and bootstrap")
    ev.add_argument("--rank-by", default=metrics[0],
                    help=f"the metric the table ranks by: {', '.join(metrics)} (default {metrics[0]})")
    ev.add_argument("--limit", type=int, default=None, help="only the first N examples")
    ev.add_argument("--on-bad-row", default="stop", choices=table_names("fnattr.dataset", "ON_BAD_ROW"),
                    help="a row without usable text or target: stop with its file line (default) or skip it")
    ev.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ev.add_argument("--png", default=None, help="write the mean deletion and insertion curves")
    _model_options(ev)
    ev.set_defaults(run=cmd_evaluate)


def _report_parser(sub) -> None:
    rep = sub.add_parser("report", help="write an interactive HTML report of a result, a dataset "
                         "run or an evaluation", description="One self-contained HTML file (no "
                         "network; opens from disk in any browser) for a result file, a dataset "
                         "run folder or an `fnattr evaluate` folder; several result files (and an "
                         "evaluate folder of the same examples) are shown side by side.")
    rep.add_argument("paths", nargs="+", metavar="PATH",
                     help="a .safetensors result, a dataset run folder or an evaluate folder")
    rep.add_argument("--out", default="report.html", metavar="FILE", help="default report.html")
    reducers = table_names("fnattr.aggregate", "REDUCERS")
    rep.add_argument("--reduce", default=None, choices=reducers, metavar="HOW",
                     help=f"how the extra dims are reduced: {', '.join(reducers)} (default: by method)")
    rep.add_argument("--normalize", action="store_true", help="divide each step by its sum of |scores|")
    rep.add_argument("--title", default=None, help="the page's heading (default: the inputs)")
    rep.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    rep.add_argument("--quiet", action="store_true", help="no status messages")
    rep.add_argument("--debug", action="store_true", help="show tracebacks")
    rep.set_defaults(run=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnattr", description="Explain what a generative language model's output depends on.",
        epilog="`fnattr COMMAND --help` explains a command; `fnattr methods` lists the methods.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _attribute_parser(sub)

    ds = sub.add_parser("attribute-dataset", help="attribute a dataset file into shards (on Ray with --workers)")
    ds.add_argument("--input", required=True, help=INPUTS)
    ds.add_argument("--text-field", "--source-field", dest="text_field", required=True,
                    help="the field with the source text (--source-field is an alias, as in evaluate)")
    ds.add_argument("--target-field", default=None)
    ds.add_argument("--out", required=True, help="folder for the shards (resumed if present)")
    ds.add_argument("--id-field", default=None,
                    help="a field with each row's id (string or integer), kept in the shards")
    ds.add_argument("--batch-size", type=int, default=8, help="examples per batch and per shard")
    ds.add_argument("--on-bad-row", default="stop", choices=table_names("fnattr.dataset", "ON_BAD_ROW"),
                    help="a row without usable text, target or id: stop with its file line (default), "
                         "or skip it and list it in the run's run.json")
    reducers = table_names("fnattr.aggregate", "REDUCERS")
    ds.add_argument("--reduce", default=None, choices=reducers, metavar="HOW",
                    help=f"reduce the extra dims (hidden, layer, head) before saving: {', '.join(reducers)} "
                         "(default: keep them; shards of gradient methods are then hidden-size times larger)")
    ds.add_argument("--workers", type=int, default=None, metavar="N",
                    help="run on Ray with N actors, each loading the model once (needs fnattr[ray])")
    ds.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="join this Ray cluster (host:port, ray://..., auto); default: start Ray here")
    ds.add_argument("--gpus-per-worker", type=float, default=0, metavar="G",
                    help="GPUs per Ray actor (default 0)")
    ds.add_argument("--cpus-per-worker", type=float, default=1, metavar="C",
                    help="CPUs per Ray actor (default 1)")
    _method_options(ds, contrast=False)
    _chat_options(ds)
    ds.set_defaults(run=cmd_dataset)

    show = sub.add_parser("show", help="re-render a saved result, or summarise a dataset run",
                          description="Print the table of a saved result FILE (and write --html / "
                          "--png), or, for the --out folder of `fnattr attribute-dataset`, the run's "
                          "summary and the tables of its first --limit examples.")
    show.add_argument("file", metavar="FILE|DIR")
    show.add_argument("--limit", type=int, default=10,
                      help="for a dataset run: show this many examples (default 10)")
    _view_options(show)
    show.add_argument("--quiet", action="store_true", help="no status messages")
    show.add_argument("--debug", action="store_true", help="show tracebacks")
    show.set_defaults(run=cmd_show)
    _evaluate_parser(sub)
    _report_parser(sub)
    from fnattr.cli.context import add_parser as _context_parser  # standard library only

    _context_parser(sub, _model_options)

    methods = sub.add_parser("methods", help="list the methods, their options and defaults")
    methods.add_argument("names", nargs="*", metavar="NAME", help="only these methods")
    methods.set_defaults(run=cmd_methods, debug=False)
    return parser


def one_line(error: BaseException, limit: int = 600) -> str:
    """The first line of `error`'s message, at most `limit` characters (a runtime type-check
    failure is a 30-line report: its first line names the function and the argument)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if text.startswith("Type-check error"):  # jaxtyping: the parameter, value and type follow
        detail = list(itertools.takewhile(lambda line: not line.startswith("---"), lines[1:4]))
        text = " ".join([text, *detail])
    elif len(lines) > 1 and text.endswith(":"):  # "... failed type check:" then the detail
        text = f"{text} {lines[1]}"
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed (a run records it)
        if args.debug:
            return args.run(args, rest)
        try:
            return args.run(args, rest)
        except UsageError as error:
            parser.exit(2, f"fnattr {args.command}: error: {error}\n")
        except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
            print(f"fnattr {args.command}: error: {one_line(error)} (run with --debug for the "
                  "whole message and the traceback)", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("fnattr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fnattr methods | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())

"""The `fnattr` command line: `attribute`, `attribute-dataset`, `show`, `evaluate`.

Errors print one line (no traceback unless `--debug`) and exit with status 1 (2 for bad usage).
"""

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fnattr import defaults

DEFAULT_SAVE = "fnattr-out.safetensors"


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


def _value(text: str) -> Any:
    """A method option value: JSON when it parses (`16`, `true`, `[1,2]`), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_options(pairs: Sequence[str], rest: Sequence[str]) -> dict[str, Any]:
    """`--arg key=value` pairs and leftover `--key value` / `--key=value` / `--flag` options."""
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"`--arg {pair}` is not key=value: write e.g. `--arg n_steps=16`.")
        opts[key.replace("-", "_")] = _value(text)
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or item == "--":
            raise UsageError(f"unexpected argument {item!r}: quote texts that contain spaces.")
        key, sep, text = item[2:].partition("=")
        if not sep:
            has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
            text, i = (rest[i + 1], i + 1) if has_value else ("true", i)
        opts[key.replace("-", "_")] = _value(text)
        i += 1
    return opts


def check_options(fn: Callable, name: str, opts: dict[str, Any]) -> None:
    """Fail before loading the model when `opts` names an option that `fn` does not take."""
    params = inspect.signature(fn).parameters
    fixed = {"model", "batch", "target_fn", "step_scores"}
    allowed = [p for p, v in params.items() if p not in fixed and v.kind is v.KEYWORD_ONLY]
    unknown = [k for k in opts if k not in allowed]
    if unknown:
        raise UsageError(f"method {name!r} has no option {', '.join(map(repr, unknown))}: "
                         f"its options are {', '.join(allowed) or 'none'}.")


def resolve_method(name: str) -> Callable:
    from fnattr.methods import METHODS

    if name not in METHODS:
        raise UsageError(f"--method {name!r} is unknown: use one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def _target_names() -> list[str]:
    from fnattr.targets import TARGETS

    return sorted(TARGETS)


def resolve_target_fn(name: str) -> Callable:
    from fnattr.targets import TARGETS

    if name not in TARGETS:
        raise UsageError(f"--target-fn {name!r} is unknown: use one of {', '.join(sorted(TARGETS))}.")
    return TARGETS[name]


def load(model: str | None, *, dtype: str | None, device: str):
    """`fnattr.load_model`, with any failure turned into one clear line."""
    from transformers.utils import logging as hf_logging

    from fnattr.loading import load_model

    hf_logging.disable_progress_bar()
    try:
        return load_model(model, dtype=dtype, device=device)
    except Exception as error:  # noqa: BLE001 - every loading failure gets the same message shape
        what = "the default model" if model is None else f"--model {model!r}"
        raise RuntimeError(f"{what} could not be loaded: {error}") from error


def _view(args: argparse.Namespace) -> dict[str, Any]:
    """How tables, HTML and PNG show the scores: `render`'s `reduction` and `normalize`."""
    return {"reduction": args.reduce, "normalize": args.normalize}


def _outputs(out, args: argparse.Namespace, log) -> None:
    from fnattr import render

    if args.save:
        out.save(args.save)
        log(f"saved {args.save}")
    if args.html:
        render.save_html(out, args.html, **_view(args))
        log(f"wrote {args.html}")
    if args.png:
        rows = out.source.shape[0]
        for r in range(rows):
            root, ext = os.path.splitext(args.png)
            path = args.png if rows == 1 else f"{root}-{r}{ext or '.png'}"
            render.save_png(out, path, row=r, **_view(args))
            log(f"wrote {path}")


def cmd_attribute(args: argparse.Namespace, rest: list[str]) -> int:
    from fnattr import render
    from fnattr.batch import prepare

    fn = resolve_method(args.method)
    target_fn = resolve_target_fn(args.target_fn)
    opts = method_options(args.arg, rest)
    check_options(fn, args.method, opts)
    if args.target is not None and len(args.target) != len(args.text):
        raise UsageError(f"{len(args.target)} --target for {len(args.text)} texts: give one "
                         "--target per text, or none to generate.")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    batch = prepare(model, tokenizer, args.text, args.target, max_new_tokens=args.max_new_tokens)
    out = fn(model, batch, target_fn, step_scores=tuple(args.step_scores), **opts)
    for src, tgt in zip(batch.sources, batch.targets):
        print(f"{src}\u2192{tgt}" if args.quiet else f"{src} \u2192 {tgt!r}")
    if not args.no_table:
        render.console(out, **_view(args))
    _outputs(out, args, log)
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_show(args: argparse.Namespace, rest: list[str]) -> int:
    from fnattr import render
    from fnattr.result import load as load_result

    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r} for `fnattr show`.")
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"{args.file!r} does not exist: pass a .safetensors file written by "
                                "`fnattr attribute --save` or `AttributionTensors.save`.")
    out = load_result(args.file)
    if not args.no_table:
        render.console(out, **_view(args))
    args.save = None
    _outputs(out, args, lambda msg: print(msg, file=sys.stderr))
    return 0


def cmd_dataset(args: argparse.Namespace, rest: list[str]) -> int:
    from fnattr import dataset

    fn = resolve_method(args.method)
    target_fn = resolve_target_fn(args.target_fn)
    opts = method_options(args.arg, rest)
    check_options(fn, args.method, opts)
    examples = dataset.read_examples(args.input, text_field=args.text_field,
                                     target_field=args.target_field)
    total = dataset.count_examples(args.input)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    config = {"input": os.path.abspath(args.input), "text_field": args.text_field,
              "target_field": args.target_field, "model": args.model}
    done = dataset.run(model, tokenizer, examples, fn, out_dir=args.out, target_fn=target_fn,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       step_scores=tuple(args.step_scores), method_args=opts, config=config,
                       total=total, progress=not args.quiet)
    if not args.quiet:
        print(f"{done} examples in {args.out}", file=sys.stderr)
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
    return {m: method_options(p, []) for m, p in grouped.items()}


def _evaluate_checks(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Everything `fnattr evaluate` can check before a model loads: names, syntax, paths."""
    from fnattr import compare
    from fnattr.evaluate import METRICS, REMOVALS
    from fnattr.methods import METHODS

    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r}: method options are "
                         "`--arg method.key=value`.")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names or len(set(names)) < len(names):
        raise UsageError(f"--methods {args.methods!r}: list distinct method names, comma-separated.")
    if unknown := [n for n in names if n not in METHODS]:
        raise UsageError(f"--methods: {', '.join(map(repr, unknown))} unknown: use "
                         f"{', '.join(sorted(METHODS))}.")
    fns = {n: METHODS[n] for n in names}
    options = _evaluate_method_args(args.arg, names)
    for name, opts in options.items():
        check_options(fns[name], name, opts)
    try:
        fractions = tuple(float(q) for q in args.fractions.split(","))
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < q <= 1 for q in fractions):
        raise UsageError(f"--fractions {args.fractions!r}: write numbers in (0, 1], e.g. 0.05,0.1,0.2.")
    for flag, value, allowed in (("--removal", args.removal, REMOVALS), ("--rank-by", args.rank_by, METRICS)):
        if value not in allowed:
            raise UsageError(f"{flag} {value!r} is unknown: use one of {', '.join(allowed)}.")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--limit", 1 if args.limit is None else args.limit),
                        ("--n-boot", args.n_boot), ("--curve-levels", args.curve_levels)):
        if value < 1:
            raise UsageError(f"{flag} {value}: it must be at least 1.")
    if args.png is not None and not args.png.lower().endswith(".png"):
        raise UsageError(f"--png {args.png!r}: name a .png file.")
    faith = {"fractions": fractions, "removal": args.removal, "n_random": args.n_random,
             "curve_levels": args.curve_levels}
    compare._faithfulness_options(METRICS, faith)
    compare.check_outputs(compare.output_paths(args.out, names) + ([args.png] if args.png else []),
                          overwrite=args.overwrite)
    return {"methods": names, "method_options": options, "target_fn": resolve_target_fn(args.target_fn),
            **faith}


def cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    import itertools

    from fnattr import compare, dataset

    run = _evaluate_checks(args, rest)
    try:
        examples = list(itertools.islice(dataset.read_examples(
            args.input, text_field=args.source_field, target_field=args.target_field), args.limit))
    except ValueError as error:  # dataset names its own command's flag
        raise ValueError(str(error).replace("--text-field", "--source-field")) from None
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    log(f"loading {args.model or 'the default model'}")
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
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


def _evaluate_parser(sub) -> None:
    from fnattr.evaluate import FRACTIONS, METRICS, REMOVALS

    fractions = ",".join(f"{q:g}" for q in FRACTIONS)
    ev = sub.add_parser("evaluate", help="compare methods by faithfulness on a .jsonl/.csv file")
    ev.add_argument("--methods", required=True, metavar="A,B,...",
                    help="comma-separated method names, e.g. saliency,integrated_gradients,occlusion")
    ev.add_argument("--input", required=True, help="a .jsonl or .csv file")
    ev.add_argument("--source-field", default="text", help="the field with the source text (default text)")
    ev.add_argument("--target-field", default=None, help="a field with forced targets (default: generate)")
    ev.add_argument("--out", default="fnattr-evaluate", metavar="DIR",
                    help="folder for per_example.jsonl and <method>.faithfulness.safetensors "
                         "(default fnattr-evaluate)")
    ev.add_argument("--model", default=None, help="hub id, model folder or .gguf file "
                    "(default: the embedded SmolLM2-135M-Instruct)")
    ev.add_argument("--target-fn", default=defaults.TARGET_FN,
                    help="a name from fnattr.targets.TARGETS: " + ", ".join(_target_names()))
    ev.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS)
    ev.add_argument("--arg", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a method option (JSON value), e.g. --arg integrated_gradients.n_steps=16")
    ev.add_argument("--removal", default="auto",
                    help=f"how a token is removed: {', '.join(REMOVALS)} (default auto: the methods' "
                         "neutral baseline; mask: dropped from the attention mask)")
    ev.add_argument("--fractions", default=fractions,
                    help=f"comprehensiveness and sufficiency fractions (default {fractions})")
    ev.add_argument("--curve-levels", type=int, default=10, help="deletion/insertion levels (default 10)")
    ev.add_argument("--n-random", type=int, default=5, help="random rankings for chance (default 5)")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ev.add_argument("--seed", type=int, default=0, help="seeds random rankings and bootstrap")
    ev.add_argument("--rank-by", default=METRICS[0],
                    help=f"the metric the table ranks by: {', '.join(METRICS)} (default {METRICS[0]})")
    ev.add_argument("--limit", type=int, default=None, help="only the first N examples")
    ev.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ev.add_argument("--png", default=None, help="write the mean deletion and insertion curves")
    ev.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as stored)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true", help="no progress or status messages")
    ev.add_argument("--debug", action="store_true", help="show tracebacks")
    ev.set_defaults(run=cmd_evaluate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, model folder or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=defaults.METHOD, help="attribution method name "
                   f"(default {defaults.METHOD}, refined until complete to 5%%)")
    p.add_argument("--target-fn", default=defaults.TARGET_FN,
                   help="a name from fnattr.targets.TARGETS: " + ", ".join(_target_names()))
    p.add_argument("--step-scores", nargs="*", default=[], metavar="NAME",
                   help="extra per-step scores to record (same names as --target-fn)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS)
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (JSON value), e.g. --arg n_steps=16; "
                        "`--n-steps 16` works as well")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as stored)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress or status messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _reducer_names() -> list[str]:
    from fnattr.aggregate import REDUCERS

    return sorted(REDUCERS)


def _view_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reduce", default=None, choices=_reducer_names(), metavar="HOW",
                   help="how the table, HTML and PNG reduce the extra dims (hidden, layer, head) "
                        f"to one score per token: {', '.join(_reducer_names())} (default: by "
                        "method: L2 norm for saliency, sum for additive methods such as IG, mean "
                        "for attention)")
    p.add_argument("--normalize", action="store_true",
                   help="divide each step's column by the sum of its absolute scores, so that "
                        "columns compare (the saved result is not changed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnattr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    att = sub.add_parser("attribute", help="attribute the generation of one or more texts")
    att.add_argument("text", nargs="+", help="source text(s)")
    att.add_argument("--target", action="append", default=None,
                     help="force this target (once per text) instead of generating")
    _common(att)
    att.add_argument("--save", default=DEFAULT_SAVE, help=f"result file (default {DEFAULT_SAVE})")
    att.add_argument("--html", default=None, help="write a standalone HTML heatmap")
    att.add_argument("--png", default=None, help="write a PNG heatmap")
    att.add_argument("--no-table", action="store_true", help="do not print the table")
    _view_options(att)
    att.set_defaults(run=cmd_attribute)

    ds = sub.add_parser("attribute-dataset", help="attribute a .jsonl/.csv file into shards")
    ds.add_argument("--input", required=True, help="a .jsonl or .csv file")
    ds.add_argument("--text-field", required=True)
    ds.add_argument("--target-field", default=None)
    ds.add_argument("--out", required=True, help="folder for the shards (resumed if present)")
    ds.add_argument("--batch-size", type=int, default=8, help="examples per batch and per shard")
    _common(ds)
    ds.set_defaults(run=cmd_dataset)

    show = sub.add_parser("show", help="re-render a saved result")
    show.add_argument("file")
    show.add_argument("--html", default=None)
    show.add_argument("--png", default=None)
    show.add_argument("--no-table", action="store_true")
    _view_options(show)
    show.add_argument("--debug", action="store_true", help="show tracebacks")
    show.set_defaults(run=cmd_show)
    _evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.debug:
        return args.run(args, rest)
    try:
        return args.run(args, rest)
    except UsageError as error:
        parser.exit(2, f"fnattr {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        print("fnattr: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"fnattr {args.command}: error: {error} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`fnattr attribute-context`: PECoRe from the command line (standard library only until the
model is needed). Prints the generated text with the context-sensitive tokens marked and, for
each, its top context tokens (or --group-by groups); saves each result as safetensors."""

import argparse
import json
import os
import time
from typing import Any

from fnattr.cli.catalog import UsageError, check_options, method_options, table_names


def add_parser(sub, model_options) -> None:
    p = sub.add_parser(
        "attribute-context", help="PECoRe: which generated tokens depend on the context, and why",
        description="Generate (or force --output) after CONTEXT and INPUT, find the generated "
        "tokens whose distribution the context changes (CTI: KL or P-CXMI against the prompt "
        "without the context, above mean + --cti-std std), and attribute each to the context "
        "tokens with a contrastive target (CCI, Sarti et al. ICLR 2024).")
    p.add_argument("--context", default=None, help="the context text (e.g. retrieved passages)")
    p.add_argument("--input", default=None, help="the input (current) text after the context")
    p.add_argument("--output", default=None, help="force this output instead of generating")
    p.add_argument("--input-file", default=None, metavar="JSONL",
                   help="one example per line: {\"context\": ..., \"input\": ..., \"output\"?: ...}")
    p.add_argument("--template", default="{context}\n{input}",
                   help="the contextual prompt (default: context, newline, input)")
    p.add_argument("--method", default="saliency", metavar="NAME",
                   help="the CCI attribution method (default saliency; any `fnattr methods` name)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, VALUE as JSON")
    p.add_argument("--cti-metric", default="kl", choices=("kl", "pcxmi"),
                   help="KL divergence (default) or P-CXMI between with and without context")
    p.add_argument("--cti-std", type=float, default=1.0,
                   help="a token is context-sensitive above mean + this many std (default 1)")
    p.add_argument("--top-k", type=int, default=3, help="context tokens or groups shown per token")
    splitters = table_names("fnattr.groups", "SPLITTERS")
    p.add_argument("--group-by", default=None, choices=splitters, metavar="NAME",
                   help=f"report context groups instead of tokens: {', '.join(splitters)}")
    p.add_argument("--chat", action="store_true",
                   help="write both prompts as the user's turn of the chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--save", default=None, metavar="PATH",
                   help="write the result (several examples: PATH-0, PATH-1, ...; default "
                        "fnattr-context-TIME.safetensors)")
    p.add_argument("--no-save", action="store_true", help="do not save the result")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    model_options(p)
    p.set_defaults(run=run)


def _examples(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.input_file is not None:
        if args.context is not None or args.input is not None or args.output is not None:
            raise UsageError("--input-file holds the examples: leave out --context, --input, --output.")
        if not os.path.isfile(args.input_file):
            raise FileNotFoundError(f"--input-file {args.input_file!r} does not exist.")
        rows = []
        with open(args.input_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("context", "input")):
                    raise UsageError(f"--input-file line {n}: give an object with string fields "
                                     "\"context\" and \"input\" (and optionally \"output\").")
                rows.append({k: row[k] for k in ("context", "input", "output") if k in row})
        if not rows:
            raise UsageError(f"--input-file {args.input_file!r} has no examples.")
        return rows
    if args.context is None or args.input is None:
        raise UsageError("give --context TEXT and --input TEXT (or --input-file JSONL).")
    return [{"context": args.context, "input": args.input, "output": args.output}]


def _paths(args: argparse.Namespace, n: int) -> list[str]:
    if args.no_save:
        return []
    path = args.save or f"fnattr-context-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    root, ext = os.path.splitext(path)
    return [path] if n == 1 else [f"{root}-{i}{ext or '.safetensors'}" for i in range(n)]


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from fnattr import cli
    from fnattr.cli.outputs import check_outputs, write_outputs

    opts = check_options(args.method, method_options(args.arg, rest))
    examples = _examples(args)
    if args.top_k < 1 or args.max_new_tokens < 1:
        raise UsageError("--top-k and --max-new-tokens must be at least 1.")
    paths = _paths(args, len(examples))
    check_outputs([("--save", p) for p in paths], overwrite=args.overwrite)
    cli._check_loading(args)
    cli._check_model(args.model)
    log = cli._logger(args)
    from fnattr.context.cues import describe, pecore

    cli._check_device(args.device)
    model, tokenizer = cli.load(args.model, **cli._loading(args))
    failed = 0
    for i, ex in enumerate(examples):
        out = pecore(model, tokenizer, context=ex["context"], input=ex["input"],
                     output=ex.get("output"), template=args.template, cti_metric=args.cti_metric,
                     cti_std=args.cti_std, method=args.method, cci_top_k=args.top_k,
                     groups=args.group_by, max_new_tokens=args.max_new_tokens, chat=args.chat,
                     **opts)
        print(describe(out))
        if paths:
            failed += write_outputs([("--save", paths[i], out.save)], overwrite=args.overwrite,
                                    command=args.command, debug=args.debug, log=log)
    return 1 if failed else 0

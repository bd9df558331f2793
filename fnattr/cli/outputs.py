"""The command line's output files: checked before any work, each written on its own and
atomically, never over an existing file unless `--overwrite`. Standard library only."""

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fnattr.cli.catalog import UsageError

SAVE_PATTERN = "fnattr-out-{stamp}.safetensors"  # the default --save: a new file every run


# ---- output files -------------------------------------------------------------------------------

def _unique(path: str) -> str:
    """`path`, or `root-2.ext`, `root-3.ext`, ...: the first that does not exist."""
    root, ext = os.path.splitext(path)
    n, out = 2, path
    while os.path.lexists(out):
        out, n = f"{root}-{n}{ext}", n + 1
    return out


def default_save() -> str:
    """The default --save: a new file named after the time, so no run replaces another's result."""
    return _unique(SAVE_PATTERN.format(stamp=time.strftime("%Y%m%d-%H%M%S")))


def png_paths(png: str, rows: int) -> list[str]:
    """One PNG per batch row: `png` itself for one row, else `name-0.png`, `name-1.png`, ..."""
    root, ext = os.path.splitext(png)
    return [png] if rows == 1 else [f"{root}-{r}{ext or '.png'}" for r in range(rows)]


def check_outputs(outputs: Sequence[tuple[str, str]], *, overwrite: bool) -> None:
    """Fail unless every (flag, path) can be written: no two name one file, none is a folder or
    exists (unless `overwrite`), and each one's folder exists or can be created. Then create the
    missing folders, so that no finished work is lost to a missing folder."""
    seen: dict[str, str] = {}
    for flag, path in outputs:
        full = os.path.abspath(path)
        if full in seen:
            raise UsageError(f"{seen[full]} and {flag} both name {path!r}: give each output its own file.")
        seen[full] = flag
        if os.path.isdir(full):
            raise IsADirectoryError(f"{flag} {path!r} is a folder: name a file, e.g. "
                                    f"{os.path.join(path, 'result')!r}.")
        if os.path.lexists(full) and not overwrite:
            raise FileExistsError(f"{flag} {path!r} exists: pass --overwrite to replace it, or "
                                  "choose another name.")
        folder = os.path.dirname(full)
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path!r} cannot be written: {folder!r} is not a "
                                  "writable folder.")
    for _, path in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_output(path: str, write: Callable[[str], None], *, overwrite: bool) -> str:
    """Run `write(temporary path)`, then move the file to `path` (atomic: a failure leaves no
    half file). A file that appeared at `path` meanwhile is kept unless `overwrite`: the new one
    then goes to `root-2.ext`. Returns where the file went."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        final = path if overwrite else _unique(path)
        os.replace(tmp, final)
        return final
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_outputs(jobs: Sequence[tuple[str, str, Callable[[str], None]]], *, overwrite: bool,
                  command: str, debug: bool, log: Callable[[str], None]) -> int:
    """Write each (flag, path, write) on its own; report each failure on one line and go on.
    Returns the number of failures."""
    failed = 0
    for flag, path, write in jobs:
        try:
            log(f"wrote {write_output(path, write, overwrite=overwrite)}")
        except Exception as error:  # noqa: BLE001 - one output's failure must not cost the others
            failed += 1
            if debug:
                import traceback

                traceback.print_exc()
            print(f"fnattr {command}: error: {flag} {path!r} was not written: {error}", file=sys.stderr)
    return failed


def group_by(args: argparse.Namespace) -> Any:
    """--group-by as `prepare(groups=)` and `render`'s `group_by`: a splitter name, or for
    documents with --group-separator the splitter `fnattr.groups.documents(separator)`."""
    name = getattr(args, "group_by", None)
    separator = getattr(args, "group_separator", None)
    if name == "documents" and separator is not None:
        from fnattr.groups import documents

        return documents(separator.encode().decode("unicode_escape"))
    return name


def check_groups(args: argparse.Namespace) -> None:
    if getattr(args, "group_by", None) == "messages" and not getattr(args, "chat", True):
        raise UsageError("--group-by messages splits a chat prompt into its turns: add --chat.")
    if getattr(args, "group_separator", None) is not None and args.group_by != "documents":
        raise UsageError("--group-separator splits documents: add --group-by documents.")
    if getattr(args, "citations", None) is not None:
        if not args.group_by:
            raise UsageError("--citations K cites source groups: add --group-by (e.g. documents).")
        if args.citations < 1:
            raise UsageError(f"--citations {args.citations}: cite at least 1 group.")


def _view(args: argparse.Namespace) -> dict[str, Any]:
    """How tables, HTML and PNG show the scores: `render`'s `reduction`, `normalize`, `group_by`
    and `show_template`."""
    return {"reduction": args.reduce, "normalize": args.normalize, "group_by": group_by(args),
            "show_template": getattr(args, "show_template", False)}


def print_citations(out, args: argparse.Namespace) -> int:
    """With --group-by: for each generated sentence of each row, its top --citations groups
    (default 3). A failure is reported on one line (1)."""
    if not getattr(args, "group_by", None):
        return 0
    try:
        from fnattr.context.cited import citations

        for row in range(out.source.shape[0]):
            print(f"citations (row {row}, top {args.citations or 3} {args.group_by}):")
            for cite in citations(out, k=args.citations or 3, by=group_by(args), row=row):
                print(cite)
        return 0
    except Exception as error:  # noqa: BLE001 - the outputs are still written
        print(f"fnattr {args.command}: error: the citations could not be printed: {error}",
              file=sys.stderr)
        return 1


def _render_jobs(out, args: argparse.Namespace, pngs: Sequence[str]) -> list:
    from fnattr import render

    jobs = []
    if args.html:
        jobs.append(("--html", args.html, lambda p: render.save_html(out, p, **_view(args))))
    for row, path in enumerate(pngs):
        jobs.append(("--png", path, lambda p, r=row: render.save_png(out, p, row=r, **_view(args))))
    return jobs


def _table(out, args: argparse.Namespace) -> int:
    """Print the table; a failure is reported on one line (1) and the outputs still written."""
    from fnattr import render

    if args.no_table:
        return 0
    try:
        render.console(out, **_view(args))
        return 0
    except Exception as error:  # noqa: BLE001 - the outputs are still written
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"fnattr {args.command}: error: the table could not be printed: {error}", file=sys.stderr)
        return 1

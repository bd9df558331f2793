"""`fnattr report PATH... --out FILE`: what the command does once its arguments are checked."""

import os
import time
from collections.abc import Callable, Sequence

from fnattr.report import write
from fnattr.report.build import kind


def run(paths: Sequence[str], out: str, *, reduction: str | None = None, normalize: bool = False,
        title: str | None = None, log: Callable[[str], None] = print) -> int:
    """Write the report of `paths` to `out`; say what each path was and how long it took."""
    start = time.perf_counter()
    kinds = [kind(p) for p in paths]  # a missing or unknown path fails before any work
    if "run" in kinds and len(paths) > 1:
        raise ValueError("a dataset run is reported on its own: pass its folder alone (or its "
                         "shards as result files).")
    path = write(list(paths), out, reduction=reduction, normalize=normalize, title=title)
    size = os.path.getsize(path)
    log(f"wrote {os.fspath(path)} ({', '.join(f'{k} {p!r}' for k, p in zip(kinds, paths))}; "
        f"{size / 1024:.0f} KiB) in {time.perf_counter() - start:.1f} s")
    return 0

"""Progress of long work on stderr: a live rich bar in a terminal, plain lines elsewhere, nothing when off.

A method opens `report(progress, "integrated_gradients", unit="forwards")` around its work and
passes the reporter it yields down to its loops as an argument (no global registry): each loop
announces the work it knows of (`expect(n)`) and reports what it did (`advance(n)`). With
`enabled=False` the reporter is `OFF`, whose methods do nothing: rich is not imported and the
loops pay one no-op call per chunk.

In a terminal (rich's `Console.is_interactive` on stderr) the reporter draws a rich progress bar.
Elsewhere (a pipe, a log file, pytest's capture, a notebook) it prints plain lines, at most one
every `interval` seconds and one at the end, so logs stay readable:

    integrated_gradients, 16 points: 96/160 forwards, 00:12 elapsed, ETA 00:08
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INTERVAL = 2.0  # seconds between two plain lines (non-terminal stderr)


class Reporter:
    """What a method's loops report to. This base class ignores everything (progress off);
    `report` yields a live one when progress is on.

    - `advance(n)`: n more units of work are done;
    - `expect(n)`: n more units of work are now known (added to the total);
    - `update(description=..., detail=..., total=...)`: a new description, a detail shown after
      the method's name ("16 points"), or a new total."""

    __slots__ = ()  # no state: `OFF` below is a constant, not mutable module state
    enabled = False  # True on a reporter that shows something: worth computing a detail for

    def advance(self, n: int = 1) -> None:
        pass

    def expect(self, n: int) -> None:
        pass

    def update(self, description: str | None = None, *, detail: str | None = None,
               total: int | None = None) -> None:
        pass


OFF = Reporter()


def _clock(seconds: int | float, *, hours: bool = False) -> str:
    """00:12, 03:25, 1:02:03 (0:00:12 with `hours`, as rich's elapsed-time column)."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h or hours else f"{m:02d}:{s:02d}"


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, emoji=False, markup=False)


class _Active(Reporter):
    """A reporter that counts and shows: a rich `Progress` in a terminal, plain lines elsewhere."""

    __slots__ = ("name", "description", "unit", "total", "completed", "start", "last",
                 "interval", "console", "bar", "task")
    enabled = True

    def __init__(self, description: str, total: int | None, unit: str, interval: int | float):
        self.name = self.description = description
        self.unit, self.total, self.completed, self.interval = unit, total, 0, interval
        self.start = self.last = time.monotonic()
        self.console = _console()
        self.bar = self.task = None
        if self.console.is_interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)

            self.bar = Progress(
                SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(None),
                MofNCompleteColumn(), TextColumn("{task.fields[unit]}", markup=False),
                TimeElapsedColumn(), TextColumn("{task.fields[eta]}", markup=False),
                console=self.console, transient=False)
            self.task = self.bar.add_task(description, total=total, unit=unit, eta="")
            self.bar.start()

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far (None before any work or without a total)."""
        if self.total is None or self.completed <= 0:
            return None
        return (time.monotonic() - self.start) * max(self.total - self.completed, 0) / self.completed

    def line(self, final: bool) -> str:
        count = f"{self.completed}" if self.total is None else f"{self.completed}/{self.total}"
        parts = [f"{self.description}: {count} {self.unit}".rstrip(),
                 f"{_clock(time.monotonic() - self.start)} elapsed"]
        eta = None if final else self.eta()
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return ", ".join(parts)

    def _show(self, final: bool = False, **fields: Any) -> None:
        if self.bar is not None:
            eta = None if final else self.eta()
            self.bar.update(self.task, completed=self.completed, total=self.total,
                            eta="" if eta is None else f"ETA {_clock(eta, hours=True)}", **fields)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.print(self.line(final=False))

    def print(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(text), soft_wrap=True)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._show()

    def expect(self, n: int) -> None:
        self.total = (self.total or 0) + n
        self._show()

    def update(self, description: str | None = None, *, detail: str | None = None,
               total: int | None = None) -> None:
        if description is not None:
            self.description = description
        if detail is not None:
            self.description = f"{self.name}, {detail}"
        if total is not None:
            self.total = total
        self._show(description=self.description)

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            self._show(final=True,
                       description=self.description if ok else f"{self.description} (stopped)")
            self.bar.stop()
        elif ok or self.completed:
            self.print(self.line(final=True) + ("" if ok else ", stopped"))


@contextmanager
def report(enabled: bool, description: str, total: int | None = None, *, unit: str = "",
           interval: int | float = INTERVAL) -> Iterator[Reporter]:
    """Show the progress of the work inside the `with` on stderr; `OFF` when not `enabled`.

    `description` names the work (a method's name), `total` counts its units (None: unknown,
    or announced later by `expect`), `unit` names them ("forwards", "layers"). On a
    non-terminal stderr, plain lines at most every `interval` seconds and one at the end
    (", stopped" after an exception, if some work was done).

    >>> with report(True, "occlusion", unit="perturbations") as bar:
    ...     bar.expect(48)
    ...     for chunk in chunks:
    ...         bar.advance(len(chunk))
    """
    if not enabled:
        yield OFF
        return
    bar = _Active(description, total, unit, interval)
    ok = False
    try:
        yield bar
        ok = True
    finally:
        bar.close(ok)


@contextmanager
def status(enabled: bool, message: str) -> Iterator[None]:
    """A status for work without a count (loading, generating): a spinner in a terminal, a
    line at the start elsewhere, and `"{message}: done in 1.2 s"` at the end. Nothing when off."""
    if not enabled:
        yield
        return
    from rich.text import Text

    console, start = _console(), time.monotonic()
    if console.is_interactive:
        with console.status(Text(message)):
            yield
    else:
        console.print(Text(f"{message} ..."), soft_wrap=True)
        yield
    console.print(Text(f"{message}: done in {time.monotonic() - start:.1f} s"), soft_wrap=True)


__all__ = ["INTERVAL", "OFF", "Reporter", "report", "status"]

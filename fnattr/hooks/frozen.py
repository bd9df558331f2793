"""`frozen`: eval mode and no parameter gradients for the duration of an attribution.

One model, one attribution at a time: `frozen` holds a lock per model (a re-entrant one, so a
thread may nest it), and a second thread that freezes the same model waits until the first is
done. The restore on exit completes even when a KeyboardInterrupt lands inside it.
"""

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()
_RETRIES = 100  # interrupts survived per restored item before giving up


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock of `model` (of the module a `torch.compile` wrapper compiles)."""
    key = getattr(model, "_orig_mod", model)
    with _LOCKS_LOCK:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
        return lock


def undo_all(items: list) -> None:
    """Call every `(fn, args)` of `items` in order: idempotent undo steps (restore a flag, remove
    a hook). One that a KeyboardInterrupt (or another error) cuts short is done again; the first
    error is raised once everything is undone."""
    pending: BaseException | None = None
    i = tries = 0
    while i < len(items):
        try:
            fn, args = items[i]
            fn(*args)
            i, tries = i + 1, 0
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the restore
            pending = pending or error
            tries += 1
            if tries >= _RETRIES:
                i, tries = i + 1, 0
    if pending is not None:
        raise pending


def _restore(flags: list, modes: list) -> None:
    """Put back every saved mode, then every saved flag (`undo_all`)."""
    items = [(setattr, (m, "training", mode)) for m, mode in reversed(modes)]
    items += [(nn.Parameter.requires_grad_, (p, flag)) for p, flag in reversed(flags)]
    undo_all(items)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode with `requires_grad=False` on every parameter; restore on exit.

    Gradients are then taken with respect to inputs only: no parameter `.grad` is touched, and
    autograd keeps no state for weight gradients. Holds `model_lock(model)` throughout: threads
    that share a model take turns.
    """
    with model_lock(model):
        flags = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            model.eval()
            yield model
        finally:
            _restore(flags, modes)

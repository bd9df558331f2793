"""Context attribution: which parts of the prompt (documents, sentences, chat turns) a generation
relies on. `context_cite` (ContextCite), `pecore` (PECoRe) and `describe`, `citations`; `lasso`
and `surrogate` the solver. Imported on first use (PEP 562): `fnattr.context.cli` (the command
line's part) imports no torch."""

import importlib

_EXPORTS = {
    "context_cite": "fnattr.context.cite", "citations": "fnattr.context.cited",
    "Citation": "fnattr.context.cited", "lasso": "fnattr.context.solver",
    "surrogate": "fnattr.context.solver", "pecore": "fnattr.context.cues",
    "describe": "fnattr.context.cues",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fnattr.context' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

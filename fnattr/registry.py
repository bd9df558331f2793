"""Which functions are attribution methods: each declares itself, in its own file, with
`@attribution_method(family=..., reduction=...)`.

The registry is read, not filled: `specs()` parses the files of the `fnattr.methods` package
(without importing them, so the command line lists methods without importing torch) and
`functions()` imports the modules that declare them. There is no table to edit and no global
state to mutate: adding a method is adding a file (docs/adding-a-method.md).

>>> specs()["saliency"].reduction
'l2'
"""

import ast
import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

PACKAGE = "fnattr.methods"
# Families in the order the command line and the docs list them; a method names one of them.
FAMILIES = ("gradients", "layers", "lrp", "internals", "perturbations")
# Reductions of a method's extra dims (`fnattr.aggregate.REDUCERS` names) a method may declare.
REDUCTIONS = ("sum", "mean", "l2", "absmax")
FALLBACK = "sum"  # a result of a function not declared here (your own): the caption still names it
MARK = "attribution_method"  # the decorator's name, as the source files spell it

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares about itself.

    `reduction` is how the views reduce its extra dims (hidden units, layers, heads) to one score
    per token, chosen by what its scores mean; `summary` is its docstring's first sentence."""

    def table_row(self) -> str:
        """The method's line in the README's table of methods."""
        return f"| `{self.name}` | {self.family} | {self.summary} | {self.reduction} |"

    name: str
    module: str
    family: str
    reduction: str
    summary: str


def _check(family: str, reduction: str, where: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"{where}: `family`={family!r} is unknown: use one of {', '.join(FAMILIES)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: `reduction`={reduction!r} is unknown: use one of "
                         f"{', '.join(REDUCTIONS)}.")


def attribution_method(*, family: str, reduction: str) -> Callable[[F], F]:
    """Declare `fn` an attribution method of `family`, whose extra dims the views reduce with
    `reduction`. It records that on the function (`fn.method_spec`) and returns it unchanged.

    >>> @attribution_method(family="gradients", reduction="sum")
    ... def my_method(model, batch, target_fn=probability, *, progress=False): ...
    """
    def mark(fn: F) -> F:
        where = f"{fn.__module__}.{fn.__name__}"
        _check(family, reduction, where)
        fn.method_spec = MethodSpec(fn.__name__, fn.__module__, family, reduction,
                                    _summary(fn.__doc__))
        return fn
    return mark


def _summary(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]


def _folders() -> tuple[str, ...]:
    """The folders of the methods package (its live `__path__` once imported)."""
    package = sys.modules.get(PACKAGE)
    if package is not None:
        return tuple(package.__path__)
    spec = importlib.util.find_spec(PACKAGE)
    return tuple(spec.submodule_search_locations or ())


def _files(folders: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(module name, path) of each public module in `folders`, by name."""
    seen = set()
    for folder in folders:
        for entry in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(entry)
            if ext == ".py" and not stem.startswith("_") and stem not in seen:
                seen.add(stem)
                yield f"{PACKAGE}.{stem}", os.path.join(folder, entry)


def _declared(module: str, path: str) -> Iterator[MethodSpec]:
    """The methods that the file `path` declares, read from its syntax tree."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            name = deco.func if isinstance(deco, ast.Call) else None
            name = getattr(name, "id", None) or getattr(name, "attr", None)
            if name != MARK:
                continue
            options = {k.arg: ast.literal_eval(k.value) for k in deco.keywords}
            where = f"{module}.{node.name}"
            _check(options.get("family"), options.get("reduction"), where)
            yield MethodSpec(node.name, module, options["family"], options["reduction"],
                             _summary(ast.get_docstring(node)))


@functools.lru_cache(maxsize=8)
def _specs(folders: tuple[str, ...], stamps: tuple[float, ...]) -> Mapping[str, MethodSpec]:
    found: dict[str, MethodSpec] = {}
    for module, path in _files(folders):
        for spec in _declared(module, path):
            if spec.name in found:
                raise ValueError(f"method {spec.name!r} is declared twice: in "
                                 f"{found[spec.name].module} and {module}.")
            found[spec.name] = spec
    ordered = sorted(found.values(), key=lambda s: FAMILIES.index(s.family))  # stable: by file within
    return {s.name: s for s in ordered}


def specs() -> Mapping[str, MethodSpec]:
    """Every declared method's spec, by name, in family order (read without importing torch)."""
    folders = _folders()
    stamps = tuple(os.stat(f).st_mtime for f in folders)
    return _specs(folders, stamps)


def function(name: str) -> Callable:
    """The method function `name` (imports its module)."""
    spec = specs()[name]
    fn = getattr(importlib.import_module(spec.module), name)
    package = sys.modules.get(PACKAGE)
    if package is not None and isinstance(getattr(package, name, None), type(sys)):
        setattr(package, name, fn)  # `fnattr.methods.NAME` is the method, not its same-named module
    return fn


def reduction(method: str) -> str:
    """The declared reduction of `method`'s extra dims; `FALLBACK` for an undeclared name."""
    spec = specs().get(method)
    return FALLBACK if spec is None else spec.reduction


class Methods(Mapping):
    """A read-only view of the methods, name -> function, that follows the files (`METHODS`)."""

    def __getitem__(self, name: str) -> Callable:
        if name not in specs():
            raise KeyError(name)
        return function(name)

    def __iter__(self) -> Iterator[str]:
        return iter(specs())

    def __len__(self) -> int:
        return len(specs())

    def __repr__(self) -> str:
        return f"Methods({', '.join(self)})"


class Reductions(Mapping):
    """A read-only view, method name -> declared reduction (`fnattr.views.DEFAULT_REDUCTION`)."""

    def __getitem__(self, name: str) -> str:
        return specs()[name].reduction

    def __iter__(self) -> Iterator[str]:
        return iter(specs())

    def __len__(self) -> int:
        return len(specs())


TABLE_HEADER = "| method | family | what it computes | views reduce extra dims by |\n|---|---|---|---|"


def table() -> str:
    """The README's table of methods, one line each, from their declarations."""
    return "\n".join([TABLE_HEADER, *(s.table_row() for s in specs().values())])

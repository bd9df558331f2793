"""What the command line knows about fnattr without importing it: the methods, their options
and defaults (read from the source files with `ast`, no torch), and `--arg` values checked
against the signatures. Standard library only, so `--help` and argument errors stay fast."""

import ast
import builtins
import functools
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, NamedTuple

from fnattr.cli.bounds import out_of_range

COMMON = ("attribute_target", "attr_pos_start", "attr_pos_end")  # every method takes them
FIXED = ("step_scores",)  # method options the command line sets itself (--step-scores)


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


# ---- fnattr's tables and signatures, read from its source files (no torch) ----------------------

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fnattr/


class _Unresolved(LookupError):
    """Something the source reader cannot follow: the caller imports the real module instead."""


_READ_ERRORS = (_Unresolved, OSError, SyntaxError, TypeError, ValueError)


def _source(module: str) -> str | None:
    base = os.path.join(_PACKAGE, *module.split(".")[1:])
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


@functools.cache
def _tree(module: str) -> ast.Module:
    path = _source(module)
    if path is None:
        raise _Unresolved(f"no source file for {module}")
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imported(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> tuple:
    if isinstance(node, ast.Import):
        target = alias.name if alias.asname else alias.name.split(".")[0]
        return ("module", target, None) if target.split(".")[0] == "fnattr" else ("external", target, None)
    if node.level or not node.module or node.module.split(".")[0] != "fnattr":
        return ("external", node.module, None)
    full = f"{node.module}.{alias.name}"
    return ("module", full, None) if _source(full) else ("from", node.module, alias.name)


@functools.cache
def _binding(module: str, name: str, depth: int = 0) -> tuple[str, str | None, Any]:
    """What `name` is bound to at the top level of `module` (the last binding), following
    `from fnattr... import`: ("value", module, expression), ("def", module, FunctionDef or
    ClassDef), ("module", module name, None), or ("external", module name, None)."""
    found = None
    for node in _tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = ("def", module, node)
        elif (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                   for t in node.targets)) or (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == name and node.value is not None):
            found = ("value", module, node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound == name:
                    found = _imported(node, alias)
    if found is None or depth > 20:
        raise _Unresolved(f"{module}.{name}")
    return _binding(found[1], found[2], depth + 1) if found[0] == "from" else found


def _resolve(module: str, node: ast.expr) -> tuple[str, str | None, Any]:
    """The binding of a name (`Baseline`) or of an attribute of an fnattr module (`_paths.Rule`)."""
    if isinstance(node, ast.Name):
        return _binding(module, node.id)
    if isinstance(node, ast.Attribute):
        kind, base, _ = _resolve(module, node.value)
        if kind == "module":
            return _binding(base, node.attr)
        if kind == "external":
            return ("external", base, None)
    raise _Unresolved(ast.unparse(node))


def _literal(module: str, node: ast.expr) -> Any:
    """The value of a literal expression, or of a module-level constant it names."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    kind, where, expr = _resolve(module, node)
    if kind != "value":
        raise _Unresolved(ast.unparse(node))
    return _literal(where, expr)


def _entries(module: str, name: str) -> tuple[str, list[tuple[Any, ast.expr | None]]]:
    """(module, [(key or item, value expression)]) of a dict, `MappingProxyType({...})` or tuple."""
    kind, where, node = _binding(module, name)
    if kind != "value":
        raise _Unresolved(f"{module}.{name}")
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        node = node.args[0]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unresolved(f"{module}.{name}")
        return where, [(_literal(where, k), v) for k, v in zip(node.keys, node.values)]
    return where, [(item, None) for item in _literal(where, node)]


@functools.cache
def constant(module: str, name: str) -> Any:
    """The value of the module-level constant `module.name`, read without importing it."""
    return _literal(module, ast.Name(name))


@functools.cache
def table_names(module: str, name: str) -> tuple:
    """The keys of dict `module.name` (or its items, for a tuple), read without importing it."""
    try:
        return tuple(key for key, _ in _entries(module, name)[1])
    except _READ_ERRORS:  # no readable source: import it after all
        import importlib

        return tuple(getattr(importlib.import_module(module), name))


def method_names() -> tuple[str, ...]:
    """The declared methods (`fnattr.registry`), read from their files."""
    from fnattr import registry

    return tuple(registry.specs())


# A spec says which JSON values an option takes: ("any",), ("none",), ("type", "int"),
# ("lit", "auto"), ("list", spec), ("dict", key spec, value spec), ("union", (spec, ...)), or
# ("py", "torch.Generator") for a Python object that no JSON value is (kept for display).
_ANY, _NONE = ("any",), ("none",)
_JSON_TYPES = ("int", "float", "bool", "str")
_SEQUENCES = frozenset({"Sequence", "MutableSequence", "Iterable", "Collection", "list", "List",
                        "tuple", "Tuple"})
_MAPPINGS = frozenset({"Mapping", "MutableMapping", "dict", "Dict"})


def _union(*specs: tuple) -> tuple:
    parts: list[tuple] = []
    for spec in specs:
        if spec == _ANY:
            return _ANY
        for part in spec[1] if spec[0] == "union" else (spec,):
            if part not in parts:
                parts.append(part)
    return parts[0] if len(parts) == 1 else ("union", tuple(parts))


def _container(name: str, items: list) -> tuple | None:
    """list[...] or dict[..., ...] from item specs, for the typing names that mean them."""
    if name in _SEQUENCES:
        return ("list", _union(*items) if items else _ANY)
    if name in _MAPPINGS:
        return ("dict", *items) if len(items) == 2 else ("dict", _ANY, _ANY)
    return None


def _spec(module: str, node: ast.expr, depth: int = 0) -> tuple:
    """The spec of an annotation in `module`'s source, following fnattr's aliases."""
    spec = functools.partial(_spec, module, depth=depth + 1)
    if depth > 30:
        return _ANY
    if isinstance(node, ast.Constant):
        if node.value is None:
            return _NONE
        try:  # a quoted annotation
            return spec(ast.parse(node.value, mode="eval").body) if isinstance(node.value, str) else _ANY
        except SyntaxError:
            return _ANY
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union(spec(node.left), spec(node.right))
    if isinstance(node, ast.Subscript):
        base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
        items = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        items = [i for i in items if not (isinstance(i, ast.Constant) and i.value is Ellipsis)]
        if base == "Literal":
            try:
                return _union(*(("lit", ast.literal_eval(i)) for i in items))
            except (ValueError, TypeError, SyntaxError):
                return _ANY
        if base in ("Optional", "Union", "Annotated"):
            return _union(*map(spec, items[:1] if base == "Annotated" else items),
                          *([_NONE] if base == "Optional" else []))
        if base in _SEQUENCES or base in _MAPPINGS:
            return _container(base, [spec(i) for i in items])
        found = spec(node.value)  # jaxtyping's Float[Tensor, "..."], an alias, ...
        return ("py", ast.unparse(node)) if found[0] == "py" else found
    if isinstance(node, ast.Name) and node.id in _JSON_TYPES:
        return ("type", node.id)
    if isinstance(node, ast.Name) and node.id in ("Any", "object"):
        return _ANY
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = node.attr if isinstance(node, ast.Attribute) else node.id
        if (found := _container(name, [])) is not None:
            return found
        try:
            kind, where, expr = _resolve(module, node)
        except _Unresolved:  # a builtin such as `range` is no JSON value; anything else: unknown
            return ("py", name) if isinstance(node, ast.Name) and hasattr(builtins, name) else _ANY
        # an alias is followed; a class, function or module of fnattr or of another library is
        # a Python object that no JSON value is
        return _spec(where, expr, depth + 1) if kind == "value" else ("py", ast.unparse(node))
    return _ANY


def runtime_spec(annotation: Any) -> tuple:
    """The spec of a runtime annotation (the fallback of the source reader, and its test)."""
    import inspect
    from collections import abc

    if annotation is inspect.Parameter.empty or annotation is Any or annotation is object:
        return _ANY
    if annotation is None or annotation is type(None):
        return _NONE
    if annotation in (int, float, bool, str):
        return ("type", annotation.__name__)
    if isinstance(annotation, str):
        return _ANY
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return _union(*(("lit", a) for a in args))
    if origin in (typing.Union, types.UnionType):
        return _union(*map(runtime_spec, args))
    if origin is typing.Annotated:
        return runtime_spec(args[0])
    kinds = {list: "list", tuple: "tuple", abc.Sequence: "Sequence", abc.MutableSequence: "Sequence",
             abc.Iterable: "Iterable", abc.Collection: "Collection", dict: "dict",
             abc.Mapping: "Mapping", abc.MutableMapping: "Mapping"}
    if (origin or annotation) in kinds:
        return _container(kinds[origin or annotation], [runtime_spec(a) for a in args if a is not ...])
    return ("py", getattr(annotation, "__qualname__", None) or repr(annotation))


def json_part(spec: tuple) -> tuple | None:
    """`spec` without its Python-only parts: what a JSON value on the command line can be."""
    kind = spec[0]
    if kind == "py":
        return None
    if kind == "union":
        parts = [p for p in map(json_part, spec[1]) if p is not None]
        return _union(*parts) if parts else None
    if kind in ("list", "dict"):
        inner = [json_part(s) for s in spec[1:]]
        return None if None in inner else (kind, *inner)
    return spec


def spec_text(spec: tuple | None) -> str:
    if spec is None:
        return "(a Python object: set it from Python)"
    kind = spec[0]
    if kind == "union":
        return " | ".join(map(spec_text, spec[1]))
    if kind in ("list", "dict"):
        return f"{kind}[{', '.join(map(spec_text, spec[1:]))}]"
    return {"any": "any", "none": "None", "lit": repr(spec[-1])}.get(kind, spec[-1])


_NO = object()  # `coerce`: the value does not fit


def coerce(spec: tuple, value: Any) -> Any:
    """`value` (parsed JSON) as an option of type `spec` takes it, else `_NO`. Conversions are
    lossless only: an int where a float is expected, "0" -> 0 for the keys of an int-keyed dict."""
    kind = spec[0]
    if kind == "any":
        return value
    if kind == "none" or kind == "lit":
        want = None if kind == "none" else spec[1]
        return value if type(value) is type(want) and value == want else _NO
    if kind == "type":
        if spec[1] == "float" and type(value) in (int, float):
            return float(value)
        return value if type(value).__name__ == spec[1] else _NO
    if kind == "union":
        return next((got for part in spec[1] if (got := coerce(part, value)) is not _NO), _NO)
    if kind == "list" and isinstance(value, list):
        items = [coerce(spec[1], v) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if kind == "dict" and isinstance(value, dict):
        out = {}
        for key, v in value.items():
            got = coerce(spec[1], key)
            if got is _NO:
                try:  # JSON object keys are always strings
                    got = coerce(spec[1], json.loads(key))
                except ValueError:
                    pass
            out[got] = coerce(spec[2], v)
            if got is _NO or out[got] is _NO:
                return _NO
        return out
    return _NO


_REQUIRED = object()  # an option without a default


class Option(NamedTuple):
    name: str
    spec: tuple
    default: Any

    def text(self) -> str:
        default = "required" if self.default is _REQUIRED else repr(self.default)
        return f"{self.name}: {spec_text(self.spec)} = {default}"


class MethodInfo(NamedTuple):
    name: str
    summary: str
    options: tuple[Option, ...]
    more: bool  # the function also takes **kwargs


def _static_info(name: str) -> MethodInfo:
    from fnattr import registry

    kind, module, fn = _binding(registry.specs()[name].module, name)
    if kind != "def" or not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise _Unresolved(name)
    options = tuple(
        Option(a.arg, _spec(module, a.annotation) if a.annotation else _ANY,
               _REQUIRED if d is None else _literal(module, d))
        for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if a.arg not in FIXED)
    return MethodInfo(name, _summary(ast.get_docstring(fn)), options, fn.args.kwarg is not None)


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _runtime_info(name: str) -> MethodInfo:
    import inspect

    from fnattr.methods import METHODS

    params = inspect.signature(METHODS[name]).parameters.values()
    options = tuple(
        Option(p.name, runtime_spec(p.annotation), _REQUIRED if p.default is p.empty else p.default)
        for p in params if p.kind is p.KEYWORD_ONLY and p.name not in FIXED)
    more = any(p.kind is p.VAR_KEYWORD for p in params)
    return MethodInfo(name, _summary(inspect.getdoc(METHODS[name])), options, more)


@functools.cache
def method_info(name: str) -> MethodInfo:
    """A method's options (names, specs, defaults) and summary, read from its source file."""
    if name not in method_names():
        raise UsageError(f"--method {name!r} is unknown: use one of {', '.join(method_names())} "
                         "(`fnattr methods` lists their options).")
    try:
        return _static_info(name)
    except _READ_ERRORS:
        return _runtime_info(name)


def methods_text(names: Sequence[str] = ()) -> str:
    """`fnattr methods`: each method with its options, their types and defaults."""
    import shutil
    import textwrap

    width = min(shutil.get_terminal_size().columns, 120)
    lines = []
    for name in names or method_names():
        info = method_info(name)
        lines += textwrap.wrap(f"{name} - {info.summary}" if info.summary else name, width,
                               subsequent_indent="  ", break_on_hyphens=False)
        own = [o.text() for o in info.options if o.name not in COMMON]
        lines += [f"    {o}" for o in own or ["(no options)"]]
    common = [o.text() for o in method_info(method_names()[0]).options if o.name in COMMON]
    tables = {n: table_names("fnattr.targets", n) for n in ("TARGETS", "CONTRAST_TARGETS", "MODEL_TARGETS")}
    notes = [
        "every method also takes " + ", ".join(common) + ".",
        ('set an option with --arg NAME=VALUE, VALUE as JSON (16, 0.1, true, null, "pad", [1, 2]; '
         "a bare word is a string), or with --NAME VALUE."),
        (f"--target-fn and --step-scores: {', '.join(tables['TARGETS'])}; with --contrast-target or "
         f"--contrast-source: {', '.join(tables['CONTRAST_TARGETS'])}; running the model: "
         f"{', '.join(tables['MODEL_TARGETS'])}."),
    ]
    notes = [line for n in notes for line in textwrap.wrap(n, width, break_on_hyphens=False)]
    return "\n".join([*lines, "", *notes])


# ---- method options -----------------------------------------------------------------------------

def _json_value(text: str) -> Any:
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
        opts[key.replace("-", "_")] = _json_value(text)
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or item == "--":
            raise UsageError(f"unexpected argument {item!r}: give all texts in one place, quoting "
                             "each text that contains spaces, and method options as --arg KEY=VALUE.")
        key, sep, text = item[2:].partition("=")
        if not sep:
            has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
            text, i = (rest[i + 1], i + 1) if has_value else ("true", i)
        opts[key.replace("-", "_")] = _json_value(text)
        i += 1
    return opts


def check_options(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    """`opts` checked against `method`'s signature, before anything loads: every name is an
    option, every value has its type (ints become floats where floats are expected)."""
    info = method_info(method)
    known = {o.name: o for o in info.options}
    unknown = [k for k in opts if k not in known]
    if unknown and not info.more:
        raise UsageError(f"method {method!r} has no option {', '.join(map(repr, unknown))}: "
                         f"its options are {', '.join(known) or 'none'} (`fnattr methods {method}`).")
    out = {}
    for key, value in opts.items():
        option = known.get(key)
        out[key] = value if option is None else coerce(json_part(option.spec) or ("py", ""), value)
        if out[key] is _NO:
            allowed = json_part(option.spec)
            what = (spec_text(allowed) if allowed not in (None, _NONE) else
                    f"{spec_text(option.spec)}, which only the Python API can pass")
            raise UsageError(f"--arg {key}={value!r}: {method} takes {key} as {what} "
                             f"(default {option.default!r}).")
        if option is not None and (want := out_of_range(method, key, out[key])):
            raise UsageError(f"--arg {key}={value!r} is out of range: {method} takes {key} as "
                             f"{want} (default {option.default!r}).")
    return out

"""The `fnattr` command line: `attribute`, `attribute-dataset`, `show`, `evaluate`, `methods`.

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
import ast
import builtins
import functools
import json
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from fnattr import defaults

SAVE_PATTERN = "fnattr-out-{stamp}.safetensors"  # the default --save: a new file every run
COMMON = ("attribute_target", "attr_pos_start", "attr_pos_end")  # every method takes them
FIXED = ("step_scores",)  # method options the command line sets itself (--step-scores)


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


# ---- fnattr's tables and signatures, read from its source files (no torch) ----------------------

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


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
def table_names(module: str, name: str) -> tuple:
    """The keys of dict `module.name` (or its items, for a tuple), read without importing it."""
    try:
        return tuple(key for key, _ in _entries(module, name)[1])
    except _READ_ERRORS:  # no readable source: import it after all
        import importlib

        return tuple(getattr(importlib.import_module(module), name))


def method_names() -> tuple[str, ...]:
    return table_names("fnattr.methods", "METHODS")


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
    where, entries = _entries("fnattr.methods", "METHODS")
    value = dict(entries)[name]
    kind, module, fn = _resolve(where, value)
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
    return out


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


def _check_input(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} does not exist: pass a .jsonl or .csv file.")


def _check_device(device: str) -> None:
    """After torch is imported, before the model loads."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {device!r} is not a device ({error}): e.g. cpu, cuda, cuda:1.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available here; use --device cpu.")


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


def _view(args: argparse.Namespace) -> dict[str, Any]:
    """How tables, HTML and PNG show the scores: `render`'s `reduction` and `normalize`."""
    return {"reduction": args.reduce, "normalize": args.normalize}


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


# ---- commands -----------------------------------------------------------------------------------

def _logger(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def load(model: str | None, *, dtype: str | None, device: str):
    """`fnattr.load_model`, with any failure turned into one clear line."""
    from transformers.utils import logging as hf_logging

    from fnattr.loading import load_model

    hf_logging.disable_progress_bar()
    try:
        return load_model(model, dtype=dtype, device=device)
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
    _check_dtype(args.dtype)
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
    from fnattr.api import resolve_target
    from fnattr.batch import prepare
    from fnattr.methods import METHODS

    _check_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    batch = prepare(model, tokenizer, args.text, args.target, max_new_tokens=args.max_new_tokens)
    contrast = None
    if args.contrast_target or args.contrast_source:
        from fnattr.contrast import prepare_contrast

        contrast = prepare_contrast(model, tokenizer, batch, contrast_targets=args.contrast_target,
                                    contrast_sources=args.contrast_source,
                                    contrast_targets_alignments=args.contrast_alignments)
    resolve = functools.partial(resolve_target, model=model, batch=batch, contrast=contrast,
                                options={}, used=set())
    out = METHODS[args.method](model, batch, resolve(args.target_fn),
                               step_scores=[resolve(s) for s in args.step_scores], **opts)
    for src, tgt in zip(batch.sources, batch.targets):
        print(f"{src}\u2192{tgt}" if args.quiet else f"{src} \u2192 {tgt!r}")
    write = functools.partial(write_outputs, overwrite=args.overwrite, command=args.command,
                              debug=args.debug, log=log)
    failed = write([("--save", args.save, out.save)] if args.save and not args.no_save else [])
    failed += _table(out, args)
    failed += write(_render_jobs(out, args, png_paths(args.png, len(args.text)) if args.png else []))
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def cmd_show(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r} for `fnattr show`.")
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"{args.file!r} does not exist: pass a .safetensors file written by "
                                "`fnattr attribute --save` or `AttributionTensors.save`.")
    check_outputs([("--html", args.html)] if args.html else [], overwrite=args.overwrite)
    from fnattr.result import load as load_result

    out = load_result(args.file)
    pngs = png_paths(args.png, out.source.shape[0]) if args.png else []
    check_outputs([("--png", p) for p in pngs], overwrite=args.overwrite)
    failed = _table(out, args)
    failed += write_outputs(_render_jobs(out, args, pngs), overwrite=args.overwrite,
                            command=args.command, debug=args.debug, log=_logger(args))
    return 1 if failed else 0


def cmd_dataset(args: argparse.Namespace, rest: list[str]) -> int:
    opts = check_options(args.method, method_options(args.arg, rest))
    _check_target_fns(args.target_fn, args.step_scores, contrast=False)
    _check_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    _check_dtype(args.dtype)
    _check_input(args.input)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file: name a folder for the shards.")
    from fnattr import dataset
    from fnattr.methods import METHODS
    from fnattr.targets import TARGETS

    examples = dataset.read_examples(args.input, text_field=args.text_field,
                                     target_field=args.target_field)
    total = dataset.count_examples(args.input)
    _check_model(args.model)
    _check_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    config = {"input": os.path.abspath(args.input), "text_field": args.text_field,
              "target_field": args.target_field, "model": args.model}
    done = dataset.run(model, tokenizer, examples, METHODS[args.method], out_dir=args.out,
                       target_fn=TARGETS[args.target_fn], batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, step_scores=tuple(args.step_scores),
                       method_args=opts, config=config, total=total, progress=not args.quiet)
    _logger(args)(f"{done} examples in {args.out}")
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
    _check_dtype(args.dtype)
    _check_input(args.input)
    return {"methods": names, "method_options": options, "target_fn": args.target_fn,
            "fractions": fractions, "removal": args.removal, "n_random": args.n_random,
            "curve_levels": args.curve_levels}


def cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    import itertools

    run = _evaluate_checks(args, rest)
    from fnattr import compare, dataset
    from fnattr.evaluate import METRICS

    faith = {k: run[k] for k in ("fractions", "removal", "n_random", "curve_levels")}
    compare._faithfulness_options(METRICS, faith)
    compare.check_outputs(compare.output_paths(args.out, run["methods"]) + ([args.png] if args.png else []),
                          overwrite=args.overwrite)
    try:
        examples = list(itertools.islice(dataset.read_examples(
            args.input, text_field=args.source_field, target_field=args.target_field), args.limit))
    except ValueError as error:  # dataset names its own command's flag
        raise ValueError(str(error).replace("--text-field", "--source-field")) from None
    log = _logger(args)
    start = time.perf_counter()
    _check_model(args.model)
    _check_device(args.device)
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
    att.add_argument("--contrast-alignments", default=None, metavar="auto|JSON",
                     help="align target with --contrast-target positions: auto (by tokens) or "
                          "[[target position, contrast position], ...] (default: position by position)")
    _method_options(att, contrast=True)
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
    ev.add_argument("--input", required=True, help="a .jsonl or .csv file")
    ev.add_argument("--source-field", default="text", help="the field with the source text (default text)")
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
    ev.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ev.add_argument("--png", default=None, help="write the mean deletion and insertion curves")
    _model_options(ev)
    ev.set_defaults(run=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnattr", description="Explain what a generative language model's output depends on.",
        epilog="`fnattr COMMAND --help` explains a command; `fnattr methods` lists the methods.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _attribute_parser(sub)

    ds = sub.add_parser("attribute-dataset", help="attribute a .jsonl/.csv file into shards")
    ds.add_argument("--input", required=True, help="a .jsonl or .csv file")
    ds.add_argument("--text-field", required=True)
    ds.add_argument("--target-field", default=None)
    ds.add_argument("--out", required=True, help="folder for the shards (resumed if present)")
    ds.add_argument("--batch-size", type=int, default=8, help="examples per batch and per shard")
    _method_options(ds, contrast=False)
    ds.set_defaults(run=cmd_dataset)

    show = sub.add_parser("show", help="re-render a saved result")
    show.add_argument("file")
    _view_options(show)
    show.add_argument("--quiet", action="store_true", help="no status messages")
    show.add_argument("--debug", action="store_true", help="show tracebacks")
    show.set_defaults(run=cmd_show)
    _evaluate_parser(sub)

    methods = sub.add_parser("methods", help="list the methods, their options and defaults")
    methods.add_argument("names", nargs="*", metavar="NAME", help="only these methods")
    methods.set_defaults(run=cmd_methods, debug=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.debug:
            return args.run(args, rest)
        try:
            return args.run(args, rest)
        except UsageError as error:
            parser.exit(2, f"fnattr {args.command}: error: {error}\n")
        except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
            print(f"fnattr {args.command}: error: {error} (run with --debug for the traceback)",
                  file=sys.stderr)
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

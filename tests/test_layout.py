"""The shape of the code: no import cycles in fnattr/ and benchmarks/, no module reaching into
another package's private modules, and one place per method (the registry)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Deferred imports (inside a function) that point back up, each for a reason: a result presents
# itself (`out.show()`, a notebook's `_repr_html_`, `out.report()`, `out.grouped()`,
# `out.citations()`) through the packages that read results. (importer, imported package)
ALLOWED_BACK_EDGES = {("fnattr.result", "fnattr.render"), ("fnattr.result", "fnattr.report"),
                      ("fnattr.result", "fnattr.groups"), ("fnattr.result", "fnattr.context")}


def _allowed(src: str, dst: str) -> bool:
    return any(src == a and (dst == b or dst.startswith(b + ".")) for a, b in ALLOWED_BACK_EDGES)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> set[str]:
    """Every module named by an import of `tree`, at any depth, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's import brings its `__init__`)."""
    paths = [*ROOT.glob("fnattr/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    trees = {_module_name(p): ast.parse(p.read_text(), str(p)) for p in paths}
    edges = {}
    for name, tree in trees.items():
        deps = set()
        for imported in _imports(tree):
            parts = imported.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        edges[name] = {d for d in deps if d in trees and d != name and not name.startswith(d + ".")}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if _allowed(node, dep):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles(graph):
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_allowed_back_edges_exist(graph):
    for src, dst in ALLOWED_BACK_EDGES:  # an exception that no longer happens is removed
        assert any(_allowed(src, d) for d in graph[src] if d == dst or d.startswith(dst + ".")), (src, dst)


def _private_owner(module: str) -> str | None:
    """The package that owns `module` if it is private (a part starting with '_'), else None."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_no_module_imports_a_private_module_of_another_package(graph):
    bad = []
    for name, deps in graph.items():
        if not name.startswith("fnattr"):
            continue  # benchmarks measure internals on purpose
        for dep in deps:
            owner = _private_owner(dep)
            if owner is not None and not (name == owner or name.startswith(owner + ".")):
                bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(sorted(bad))

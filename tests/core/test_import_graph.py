"""The package's shape: no import cycle, and no file of plugin/ over 400 lines.

Module-level imports are the `import` statements that run when a module is imported (at the top, in
class bodies, in module-level `if` / `try`), not those inside functions nor under `TYPE_CHECKING`.
A cycle among them breaks an import; a cycle that goes through an import inside a function (a
"late" import, there to dodge the first kind) still ties the modules into one, so neither is allowed.
`plugin/` is the package `loraforge`, `integrations/` is `loraforge.integrations`."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"plugin": "loraforge", "integrations": "loraforge.integrations"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _top_level_imports(tree: ast.Module, late: bool = False):
    def walk(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                yield from walk(node.body)
                yield from walk(getattr(node, "orelse", []))
                yield from walk(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    yield from walk(handler.body)
            elif isinstance(node, ast.ClassDef) or (late and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
                yield from walk(node.body)
            elif late:
                yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    yield from walk(tree.body)


def import_graph(late: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _top_level_imports(ast.parse(path.read_text(), str(path)), late):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert len(graph) > 40
    assert "loraforge.core.layer" in graph["loraforge.core.quantized"]  # a relative import, resolved
    assert "loraforge.registry" in graph["loraforge.salora"]  # `from ..registry import ...` in a package


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_import_cycle_through_late_imports():
    graph = import_graph(late=True)
    assert "loraforge.registry" in graph["loraforge.train"]  # imported inside `adapter_config`
    assert "loraforge.registry" not in import_graph()["loraforge.train"]
    assert cycles(graph) == []


def test_no_plugin_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "plugin").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}

"""The shape of the package, checked: no import cycle, modules that read in one sitting.

The import graph is read from the source with ``ast`` (imports at module
level, outside ``if TYPE_CHECKING:``; imports inside functions are the
deliberate lazy ones and do not count), so a cycle is found before it bites
at import time in some order nobody tried.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "pulse"

#: A module longer than this no longer reads in one sitting.
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_imports(path: Path, modules: Set[str]) -> Set[str]:
    """The pulse modules that ``path`` imports when it is imported."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()

    def visit(body: List[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.add(target)
                found.update(target + "." + alias.name for alias in node.names)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def import_graph() -> Dict[str, Set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_imports(p, modules) for p in paths}


def test_the_import_graph_reads_real_imports() -> None:
    graph = import_graph()
    assert "pulse.loop" in graph["pulse.server"]
    assert "pulse._sys.registry" in graph["pulse._sys"]


def test_no_import_cycle() -> None:
    graph = import_graph()
    # A package imports its submodules' parents anyway: edges to an
    # enclosing package are not part of a cycle Python cannot resolve.
    for name, deps in graph.items():
        deps.difference_update(d for d in list(deps) if name.startswith(d + "."))
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_reads_in_one_sitting() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            for n in [len(p.read_text().splitlines())] if n > MAX_LINES}
    assert not long, "modules over {} lines: {}".format(MAX_LINES, long)

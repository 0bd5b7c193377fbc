"""mtt's import graph has no cycle: every module can be understood (and imported) after the ones
it depends on. Function-level and ``TYPE_CHECKING`` imports count too, since a lazy import that
closes a cycle is still two modules that each need the other."""

import ast
from pathlib import Path

import mtt

PACKAGE = Path(mtt.__file__).parent


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], package_dir: Path) -> set[str]:
    """The modules of ``modules`` that ``path`` imports anywhere in its body (``from mtt import x``
    names module ``mtt.x`` when that is a module)."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, for every ``.py`` under ``package``."""
    files = sorted(package.rglob("*.py"))
    modules = {module_name(f, package) for f in files}
    return {module_name(f, package): imported_modules(f, modules, package) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; depth-first search."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_mtt_has_no_import_cycle():
    graph = import_graph()
    assert "mtt.data.embedded" in graph["mtt.data.datasets"]  # a function-level import is an edge
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle_through_a_lazy_import(tmp_path):
    # The check itself, on a package shaped like the cycle mtt.data once had: index imported the
    # generator inside a function, the generator imported index at the top.
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "index.py").write_text("def build():\n    from pkg.data.synth import make\n    return make()\n")
    (pkg / "data" / "synth.py").write_text("from . import index\nimport json\n\ndef make():\n    return 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.data.index"] == {"pkg.data.synth"} and "pkg.data.index" in graph["pkg.data.synth"]
    assert find_cycle(graph) == ["pkg.data.index", "pkg.data.synth", "pkg.data.index"]
    (pkg / "data" / "synth.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None

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


# mtt's layers, lowest first (README's module map): a module may import its own layer and the
# ones before it, never a later one. The commands (``python -m mtt.run``, ``mtt.compare``, ...)
# are the modules directly under mtt/, above every layer.
LAYERS = (
    "mtt.core",
    "mtt.metrics",
    "mtt.config",
    "mtt.data",
    "mtt.features",
    "mtt.models",
    "mtt.tracking",
    "mtt.serving",
    "mtt.training",
    "mtt.analysis",
)
COMMANDS = "commands"


def layer_of(module: str, layers: tuple[str, ...] = LAYERS, root: str = "mtt") -> str:
    """The declared layer ``module`` belongs to: a package of ``layers`` (or a module under it),
    ``COMMANDS`` for a module directly under ``root``, ``root`` for the package itself."""
    if module == root:
        return root
    for layer in layers:
        if module == layer or module.startswith(layer + "."):
            return layer
    if module.count(".") == root.count(".") + 1:
        return COMMANDS
    raise AssertionError(f"{module} is in no declared layer: add its package to LAYERS")


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS, root: str = "mtt") -> list[str]:
    """'a -> b' for every import of a module ``b`` in a later layer than ``a``'s (a command may
    import anything; the package itself nothing)."""
    order = {root: -1, **{layer: i for i, layer in enumerate(layers)}, COMMANDS: len(layers)}
    layer = {module: layer_of(module, layers, root) for module in graph}  # every dep is in graph
    return [
        f"{module} ({layer[module]}) -> {dep} ({layer[dep]})"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if order[layer[dep]] > order[layer[module]]
    ]


def test_no_layer_imports_a_later_one():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == {"mtt", COMMANDS, *LAYERS}  # every layer holds modules
    assert layer_of("mtt.run") == COMMANDS and layer_of("mtt.data.embedded.cache") == "mtt.data"
    assert upward_imports(graph) == []


def test_the_layer_check_sees_a_lower_layer_importing_a_higher_one(tmp_path):
    # The check itself, on a package shaped like mtt: the config importing the data's readers
    # (as mtt.config once did, lazily, for data.root's checks) is an import against the order.
    pkg = tmp_path / "pkg"
    for sub in ("config", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "datasets.py").write_text("from pkg.config import rules\n")
    (pkg / "config" / "rules.py").write_text("def check(cfg):\n    from pkg.data.datasets import x\n")
    (pkg / "run.py").write_text("import pkg.data.datasets\n")
    layers = ("pkg.config", "pkg.data")
    assert upward_imports(import_graph(pkg), layers, "pkg") == [
        "pkg.config.rules (pkg.config) -> pkg.data.datasets (pkg.data)"
    ]
    (pkg / "config" / "rules.py").write_text("def check(cfg):\n    return []\n")
    assert upward_imports(import_graph(pkg), layers, "pkg") == []

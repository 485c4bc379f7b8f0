"""The README's install and test recipes, `.ci/run`, `pyproject.toml` and
`.ci/constraints.txt` stay in step; the README stays one page and its details live in the
documentation site (`docs/`, `mkdocs.yml`), which CI builds with `mkdocs build --strict`."""

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
DOCS = ROOT / "docs"
INSTALL_PAGE = (DOCS / "install.md").read_text(encoding="utf-8")
# The site's folders that `docs/gen_*.py` write at build time (not in the tree).
GENERATED = ("reference/", "results/")
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
    for install in (_section("Install"), INSTALL_PAGE):
        commands = "\n".join(_bash_blocks(install))
        assert "-c .ci/constraints.txt -e ." in commands
        assert "--upgrade --upgrade-strategy eager -e ." in commands
        assert '--index-url "$TORCH_CPU_INDEX"' in commands


def test_package_indexes_are_named_only_through_a_variable():
    """No package index address is written down: the reader takes it from PyTorch's selector."""
    pages = [(f"docs/{p.name}", p.read_text(encoding="utf-8")) for p in DOCS.glob("*.md")]
    for name, text in (("README.md", README), (".ci/run", CI), *pages):
        for flag, value in re.findall(r"(--(?:extra-)?index-url)[ =]+(\S+)", text):
            assert value.startswith('"$'), f"{name}: {flag} {value}"
        assert not re.search(r"PIP_(?:EXTRA_)?INDEX_URL=(?!\"\$)", text), name
    for name, text in (("README.md Install", _section("Install")), (".ci/run", CI),
                       ("docs/install.md", INSTALL_PAGE),
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


def _nav_pages() -> list[str]:
    """The pages `mkdocs.yml`'s nav names (`Title: page.md` or a generated `folder/`)."""
    return re.findall(r"^\s*- [^:\n]+: (\S+)$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


def test_the_readme_is_one_page_that_links_into_the_docs():
    assert len(README.splitlines()) <= 250, "the README is one page: move detail to docs/"
    links = re.findall(r"\]\((docs/[^)#\s]+)", README)
    # Every page is one click from the README (its own Quickstart is the quickstart page).
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")} - {"docs/quickstart.md"}
    assert pages <= set(links), f"not linked from the README: {sorted(pages - set(links))}"
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
    for title in ("Quickstart", "Install", "What each epsilon promises", "Running experiments",
                  "The run folder", "Where things are"):
        assert _section(title).strip()


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    nav = _nav_pages()
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = {p for p in nav if not p.startswith(GENERATED)}
    assert listed == written, (f"in docs/ but not in the nav: {sorted(written - listed)}; "
                               f"in the nav but not in docs/: {sorted(listed - written)}")
    assert {"reference/", "results/experiments.md", "results/benchmarks.md"} <= set(nav)
    for script in re.findall(r"^\s*- (docs/\S+\.py)$", (ROOT / "mkdocs.yml").read_text(),
                             flags=re.M):
        assert (ROOT / script).is_file(), script


def test_docs_links_point_at_pages_that_exist():
    """`mkdocs build --strict` checks links and anchors in CI; this is the fast half of it
    (files only), which needs no MkDocs."""
    for page in DOCS.rglob("*.md"):
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if "://" in target or not path:
                continue
            resolved = (page.parent / path).resolve().relative_to(DOCS.resolve()).as_posix()
            assert resolved.startswith(GENERATED) or (DOCS / resolved).is_file(), (
                f"{page.relative_to(ROOT)} links to {target}")


def test_ci_builds_the_docs_strictly_with_the_docs_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["docs"]
    names = {canonicalize_name(Requirement(r).name) for r in extras}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocs-gen-files",
            "mkdocs-literate-nav"} <= names
    assert "python" in next(Requirement(r) for r in extras
                            if Requirement(r).name == "mkdocstrings").extras
    assert ".venv/bin/pip install -q -e '.[docs]' &&" in CI
    assert ".venv/bin/mkdocs build --strict" in CI
    assert "failed+=(docs)" in CI
    assert re.search(r"^strict: true$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)

"""ATTACK35: tests/conftest.py loads the "deterministic" Hypothesis profile in its module
body, and test_discovery.py, test_split.py, test_readme.py and lm_fixtures.py import it a
second time as `tests.conftest`. That second import runs during collection, after the
Hypothesis plugin has loaded the profile named on the command line, so
`--hypothesis-profile=explore` (docs/development.md: new inputs, a deliberate step) is
silently replaced by "deterministic" for every test of any run that collects one of those
modules (the whole suite, the README's command, `tests/`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
PROBE = "ATTACK35_PROFILE_PROBE"


def test_inner_probe_reads_the_loaded_profile():
    """Run by the test below in a child pytest only: the profile in force there."""
    asked = os.environ.get(PROBE)
    if asked is None:
        pytest.skip("only the child pytest of the tests below runs this probe")
    assert settings.get_current_profile_name() == asked
    assert settings.default.derandomize is (asked == "deterministic")


@pytest.mark.parametrize("paths", [
    ["tests/test_fuzz.py", "tests/test_early_errors.py"],  # docs/development.md's command
    ["tests/test_fuzz.py", "tests/test_early_errors.py", "tests/test_discovery.py"],
    [],  # no path: `testpaths`, as the README's command runs the suite
])
def test_an_explore_profile_asked_for_is_in_force(paths, tmp_path):
    """Adversary: none (a test-process defect that hides inputs from the attacker's own
    check): THREATS.md "How to attack your own change" relies on fresh generated inputs,
    which the documented explore step silently does not draw once a module that imports
    `tests.conftest` is collected beside the fuzz tests."""
    env = {**os.environ, PROBE: "explore", "PYTHONPATH": str(ROOT),
           "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
    probe = [] if not paths else [str(Path(__file__).relative_to(ROOT))]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--hypothesis-profile=explore", *paths, *probe,
         "-k", "inner_probe_reads_the_loaded_profile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-1500:] + child.stderr[-1500:]


def test_without_a_profile_asked_for_the_inputs_are_fixed_by_the_code(tmp_path):
    """The README's command names no profile: every generated-input test draws the inputs
    its code fixes (a CI run is green or red by the commit, never by chance)."""
    env = {**os.environ, PROBE: "deterministic", "PYTHONPATH": str(ROOT),
           "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "tests/test_discovery.py", str(Path(__file__).relative_to(ROOT)),
         "-k", "inner_probe_reads_the_loaded_profile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-1500:] + child.stderr[-1500:]

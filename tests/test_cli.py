"""CLI behaviour that needs no simulation: clear one-line errors, README/CI in step.

One error goes through a real `python -m fedtune.cli` process (the exit code and output a
user sees), and so do the errors that come while Ray starts (`fresh_runs`: each its own
process, started together); the others call the same typer app in this process, which skips
the seconds of imports a new process pays (these errors come before any actor starts); see
the `cli` fixture in conftest.py."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fedtune(*args):
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# Errors that come while Ray and the workers start (the task is built meanwhile): each
# `fedtune` run in its own process, as a run starts Ray, which a test process that already
# started Ray (another test file on the same xdist worker) refuses to start again.
FRESH = {
    "backbone": ("--set", "model.backbone=no-such-org/no-such-model"),
    "natural": ("--set", "data.partition=natural"),
    "path": ("--set", "data.options.path='/no/such.jsonl.gz'"),
}


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """`fedtune run` with each of FRESH's settings, all started at once: each process mostly
    waits for Ray and its workers to start and stop again, so they overlap well. Maps each
    name to (exit code, stdout and stderr)."""
    root = tmp_path_factory.mktemp("fresh")
    procs = {name: subprocess.Popen([sys.executable, "-m", "fedtune.cli", "run", *sets, "--out",
                                     str(root / name)], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, sets in FRESH.items()}
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=180)
            results[name] = (proc.returncode, stdout + stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_bad_config_value_is_one_clear_line_not_a_traceback():
    proc = _fedtune("run", "--set", "tuning.method=nope")
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "error: tuning.method='nope' is not one of: bitfit, head, lora, prompt, slash" in out
    assert "Traceback" not in out


def test_missing_config_file(cli):
    code, _, out = cli("run", "no/such/file.toml")
    assert code == 2
    assert "config file not found: no/such/file.toml" in out


def test_unavailable_backbone_is_named(fresh_runs):
    code, out = fresh_runs["backbone"]
    assert code == 2, out[-2000:]
    assert "model.backbone='no-such-org/no-such-model' is not available offline" in out
    assert "Traceback" not in out


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci


def test_data_errors_are_one_line(fresh_runs):
    code, out = fresh_runs["natural"]
    assert code == 2, out[-2000:]
    assert "error: data.num_clients=20 but natural partitioning by 'mailing_list'" in out
    assert "Traceback" not in out
    code, out = fresh_runs["path"]
    assert code == 2 and "corpus file not found: /no/such.jsonl.gz" in out

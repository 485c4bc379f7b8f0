"""CLI behaviour that needs no simulation: clear one-line errors, README/CI in step.

One error goes through a real `python -m fedtune.cli` process (the exit code and output a
user sees); the others call the same typer app in this process, which skips the seconds of
imports a new process pays (these errors come before any actor starts); see the `cli`
fixture in conftest.py."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fedtune(*args):
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _run_fresh(*args: str) -> tuple[int, str]:
    """`fedtune` in its own process: a run starts Ray, which a test process that already
    started Ray (another test file on the same xdist worker) refuses to start again."""
    return _run_fresh_together(args)[0]


def _run_fresh_together(*commands: tuple[str, ...]) -> list[tuple[int, str]]:
    """`_run_fresh` of several commands at once, each in its own process (its own Ray):
    each mostly waits for Ray to start and stop again, so they overlap well."""
    procs = [subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            results.append((proc.returncode, stdout + stderr))
    finally:
        for proc in procs:
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


def test_unavailable_backbone_is_named(tmp_path):
    code, out = _run_fresh("run", "--set", "model.backbone=no-such-org/no-such-model", "--out",
                    str(tmp_path / "run"))
    assert code == 2, out[-2000:]
    assert "model.backbone='no-such-org/no-such-model' is not available offline" in out
    assert "Traceback" not in out


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci


def test_data_errors_are_one_line(tmp_path):
    (code, out), (code2, out2) = _run_fresh_together(
        ("run", "--set", "data.partition=natural", "--out", str(tmp_path / "r")),
        ("run", "--set", "data.options.path='/no/such.jsonl.gz'", "--out", str(tmp_path / "r2")))
    assert code == 2, out[-2000:]
    assert "error: data.num_clients=20 but natural partitioning by 'mailing_list'" in out
    assert "Traceback" not in out
    assert code2 == 2 and "corpus file not found: /no/such.jsonl.gz" in out2

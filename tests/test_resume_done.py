"""`fedtune run --resume` of a run whose rounds are all done (issue 30, item 6): the final
model is scored and summary.json written without starting Ray or the workers (it spent
~50 s starting them only to score the final model)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["name=done", "data.num_clients=2", "train.clients_per_round=2", "train.rounds=1",
        "train.local_steps=1", "train.batch_size=16", "model.max_length=16",
        "tuning.prompt.length=2", "train.eval_max_examples=32",
        "privacy.reproducible_noise=true"]
FIGURES = ("final_accuracy", "best_val_accuracy", "best_round", "epsilon_sample",
           "epsilon_user", "delta", "noise", "rounds", "total_bytes_up", "total_bytes_down",
           "trainable_params", "method")


def _no_ray(monkeypatch) -> list[str]:
    """Any start of Ray (or the simulation) by the driver is recorded and refused."""
    import fedtune.sim.driver as driver

    started: list[str] = []

    def refuse(*args, **kwargs):
        started.append("ray")
        raise AssertionError("Ray started")

    monkeypatch.setattr(driver, "start_ray", refuse)
    # Whether Ray may listen on loopback here depends on what this worker process imported
    # before (local_ray.check_node_address): not this test's question, so the scope is inert.
    monkeypatch.setattr(driver, "_ray_scope", lambda cfg, temp: contextlib.nullcontext())
    return started


def test_the_shortcut_scores_a_finished_run_without_ray(tmp_path, monkeypatch):
    # Without a real run: a checkpoint at the last round sends the driver straight to the
    # server's scoring (run_server with no grid), never to Ray.
    import fedtune.sim.driver as driver
    import strategies.server as server
    from fedtune.config import load_config
    from fedtune.run.checkpoint import ServerState

    started = _no_ray(monkeypatch)
    cfg = load_config(None, ["train.rounds=3"])
    calls = []
    monkeypatch.setattr(driver, "_checkpoint_state",
                        lambda cfg, out: ServerState(round=3, vector=None, spec_hash="x",
                                                     initial={}))
    monkeypatch.setattr(server, "run_server",
                        lambda grid, cfg, out, on_round, resume: calls.append(
                            (grid, resume)) or {"final_accuracy": 0.5})
    assert driver.run_experiment(cfg, tmp_path, resume=True) == {"final_accuracy": 0.5}
    assert calls == [(None, True)] and not started
    # rounds left: the shortcut is not taken (the task is not built here: Ray is refused)
    monkeypatch.setattr(driver, "_driver_task", lambda *args: None)
    monkeypatch.setattr(driver, "_checkpoint_state",
                        lambda cfg, out: ServerState(round=2, vector=None, spec_hash="x",
                                                     initial={}))
    with pytest.raises(AssertionError, match="Ray started"):
        driver.run_experiment(cfg, tmp_path, resume=True)
    assert started == ["ray"]


@pytest.mark.slow
def test_resume_of_a_finished_run_rebuilds_its_summary_without_ray(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fedtune.cli", "run", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    original = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()  # stopped after its last round, before the summary
    started = _no_ray(monkeypatch)
    began = time.perf_counter()
    res = cli("run", "--resume", str(out))
    took = time.perf_counter() - began
    assert res.code == 0, res.output
    assert not started
    rebuilt = json.loads((out / "summary.json").read_text())
    for key in FIGURES:
        assert rebuilt[key] == original[key], key
    assert rebuilt["resumed_at_rounds"] == [1]
    assert "resuming after round 1 of 1" in res.stdout
    print(f"resume of a finished run: {took:.1f} s")

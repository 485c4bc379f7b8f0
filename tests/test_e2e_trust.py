"""End to end through the simulation engine: the typed protocol between real ClientApps and
the ServerApp, what a withholding client sends, and a run in which nobody contributes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_e2e_sim import ONE_ACTOR

ROOT = Path(__file__).resolve().parents[1]
# Tiny: what these tests check is the protocol, not what is learnt (16 tokens is the
# lifecycle tests' length too, so the token cache is shared).
TINY = ["data.num_clients=4", "train.clients_per_round=2", "train.rounds=2",
        "train.local_steps=2", "train.batch_size=8", "model.max_length=16",
        "tuning.prompt.length=4", "train.eval_max_examples=32",
        *ONE_ACTOR]  # see test_e2e_sim.ONE_ACTOR


def _run(out, overrides):
    args = [sys.executable, "-m", "fedtune.cli", "run", str(ROOT / "experiments/quickstart.toml"),
            "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _rounds(out):
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_in_which_nobody_contributes_fails_with_a_clear_message(tmp_path):
    out = tmp_path / "nobody"
    # Equal partitions: the server charges every client it asks, and calibrates the noise
    # once per client size (seconds each), not once per client.
    proc = _run(out, [*TINY, "faults.crash_p=1.0", "data.partition=iid"])
    assert proc.returncode != 0
    assert "no client contributed in any of the 2 rounds" in proc.stdout + proc.stderr
    rounds = _rounds(out)  # the ledger survives
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["no_contribution"] and r["clients"] == 0 and len(r["failed"]) == 2
               for r in rounds)
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_withheld_metrics_never_reach_the_server(tmp_path):
    out = tmp_path / "withheld"
    proc = _run(out, [*TINY, "privacy.sample.enabled=false", "privacy.user.enabled=true",
                      "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50",
                      "privacy.user.withhold_metrics=true", "train.clients_per_round=4",
                      "privacy.user.log_cohorts=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = _rounds(out)
    clients = [c for r in rounds for c in r["per_client"]]
    assert clients, "no client was sampled in two rounds at q = 1"
    for c in clients:
        assert not {"num_examples", "loss", "examples_seen", "flops"} & set(c)
        assert c["steps"] == 2 and c["reported_dp"] is None and c["weight"] == 1.0
    for r in rounds:
        assert r["train_loss"] is None and r["no_contribution"] is False
        assert "num_examples" in r["privacy_in_clear"]["withheld"]
        assert max(r["privacy_user"]["aggregated_delta_norms"]) <= 5.0 * (1 + 1e-9)

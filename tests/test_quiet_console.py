"""Issue 30, item 4 (and item 3 end to end): without `--verbose` a run's console holds no
dependency warnings or notices (Opacus' "Optimal order is the largest alpha" UserWarning,
Flower's "DEBUG:Terminated 2 actors" and "Manually terminating ClientAppActor", `datasets`'
progress bars): they go to the run's log file (`run.log`). Start-up times count from
fedtune's start, not the shell's. A 3-class run that ends at the majority rate says so in its
final line."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dependency_warnings_and_notices_go_to_the_log_file(tmp_path, capfd):
    from fedtune.runtime.quiet import LOG_ENV, route_to_log, routed, unroute

    log_file = tmp_path / "run.log"
    flwr_level = logging.getLogger("flwr").level
    route_to_log(log_file)
    try:
        assert routed()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Through the routed showwarning (catch_warnings keeps it), as a library warns.
            warnings.warn("Optimal order is the largest alpha. Please consider expanding",
                          UserWarning, stacklevel=1)
        logging.getLogger("flwr").debug("Terminated %i actors", 2)
        logging.getLogger("flwr").warning("Manually terminating %s", "ClientAppActor")
        logging.getLogger("opacus.utils").warning("a dependency's own notice")
        logging.getLogger("fedtune.task.evaluation").warning("fedtune's own warning")
        logging.getLogger("ray").error("a dependency's error")
        assert log_file.is_absolute() and Path(__import__("os").environ[LOG_ENV]) == log_file
    finally:
        unroute()
    console = "".join(capfd.readouterr())
    for quiet in ("Optimal order", "Terminated 2 actors", "Manually terminating",
                  "a dependency's own notice"):
        assert quiet not in console
    assert "fedtune's own warning" in console and "a dependency's error" in console
    logged = log_file.read_text()
    for routed_text in ("UserWarning: Optimal order", "flwr DEBUG: Terminated 2 actors",
                        "flwr WARNING: Manually terminating ClientAppActor",
                        "a dependency's own notice"):
        assert routed_text in logged
    # Undone: the next record is the console's again, the file closed and left alone.
    assert not routed() and logging.getLogger("flwr").level == flwr_level
    logging.getLogger("opacus.utils").warning("after unroute")
    assert "after unroute" not in log_file.read_text()


def test_verbose_routes_nothing_to_the_log_file(cli, monkeypatch, tmp_path, recwarn):
    """`fedtune run --verbose` leaves dependencies' warnings where they are raised (the
    console): nothing is routed and no run.log is written. (Without it, the warnings go to
    run.log: the DP run below.) The simulation itself is replaced: this is about the
    console."""
    import fedtune.cli as cli_module
    from fedtune.runtime.quiet import routed

    seen: dict[str, bool] = {}

    def fake_run(cfg, out, verbose, resume):
        seen["routed"], seen["verbose"] = routed(), verbose
        warnings.warn("Optimal order is the largest alpha (a dependency)", UserWarning,
                      stacklevel=1)
        return {}

    monkeypatch.setattr(cli_module, "_run_with_progress", fake_run)
    monkeypatch.setattr(cli_module, "_print_summary", lambda *a: None)
    out = tmp_path / "run"
    code, _, output = cli("run", "--out", str(out), "--verbose")
    assert code == 0, output
    assert seen == {"routed": False, "verbose": True}
    assert any("Optimal order" in str(w.message) for w in recwarn)  # shown, not routed
    assert not (out / "run.log").exists()


def test_startup_times_count_from_fedtune_not_from_the_shell():
    """`bash -c "sleep 2 && fedtune ..."` hands its process to the last command: the
    process's creation time is the shell's, two seconds before fedtune started."""
    code = ("import time; from fedtune.runtime.startup import launch_time; "
            "print(time.time() - launch_time())")
    proc = subprocess.run(["bash", "-c", f"sleep 2 && exec {sys.executable} -c '{code}'"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 1.5, proc.stdout


# --- end to end: a tiny DP run on a 3-class CSV the test writes ----------------------------

def _three_class_csv(folder: Path) -> Path:
    """No signal in the texts, labels 70/20/10: nothing to learn beyond the majority."""
    rng = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    rows = ["text,label"]
    for i in range(240):
        label = "pos" if i % 10 < 7 else ("neg" if i % 10 < 9 else "neutral")
        rows.append(f"{' '.join(rng.choice(words) for _ in range(6))},{label}")
    file = folder / "reviews.csv"
    file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return file


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    data = _three_class_csv(folder)
    out = folder / "run"
    sets = ["data.corpus=hf", "data.options.path=csv", f"data.options.data_files={str(data)!r}",
            "data.partition=iid", "data.num_clients=2", "train.clients_per_round=2",
            "train.rounds=1", "train.local_steps=1", "model.max_length=16", "train.lr=1e-9",
            "privacy.sample.enabled=true"]
    args = [sys.executable, "-m", "fedtune.cli", "run", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    # The caller holds the machine's e2e lock if it uses one (as for every slow test).
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, out


@pytest.mark.slow
def test_a_dp_run_prints_no_dependency_warning_without_verbose(dp_run):
    proc, out = dp_run
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    for noise in ("UserWarning", "DEBUG", "Terminated", "Manually terminating", "Generating",
                  "Map:"):
        assert noise not in console, console[-3000:]
    assert "Optimal order is the largest alpha" in (out / "run.log").read_text()


@pytest.mark.slow
def test_a_run_at_the_majority_rate_says_so_in_its_final_line(dp_run):
    proc, out = dp_run
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert summary["majority_label"] == "pos"
    assert summary["final_accuracy"] <= summary["majority_accuracy"], summary
    assert rounds[0]["majority_val_accuracy"] == summary["majority_val_accuracy"]
    final = " ".join(proc.stdout.split())  # the console wraps the line at its width
    assert (f"did not beat the majority class ({summary['majority_accuracy']:.4f})"
            in final), proc.stdout[-2000:]


@pytest.mark.parametrize("smashed_dp", [False, True])
def test_a_split_runs_final_line_states_what_its_epsilon_covers(tmp_path, smashed_dp):
    """The summary says a split run's epsilon covers the deltas only and its smashed data
    went up in clear; the final line says the same (it read `epsilon_sample 7.999 ...`)."""
    from rich.text import Text

    from fedtune.cli import summary_line
    from fedtune.config import load_config

    cfg = load_config(None, ["split.enabled=true", "tuning.method=prompt",
                             f"split.smashed_dp.enabled={str(smashed_dp).lower()}"])
    summary = {"wall_s": 3.0, "final_accuracy": 0.9, "initial_accuracy": 0.5,
               "majority_accuracy": 0.6, "best_val_accuracy": None, "epsilon_sample": 7.999,
               "epsilon_user": None, "total_bytes_up": 337_960,
               "total_smashed_bytes_up": 86_800_000, "trainable_params": 5}
    line = " ".join(Text.from_markup(summary_line(summary, tmp_path, cfg)).plain.split())
    if smashed_dp:
        assert "epsilon_sample 7.999 (deltas and smashed data), epsilon_user" in line
        assert "86,800,000 B smashed data up," in line and "in clear" not in line
    else:
        # (after the epsilon's own mark, "[data in clear]")
        assert "(deltas only; smashed data in clear), epsilon_user" in line
        assert "337,960 B up, 86,800,000 B smashed data up in clear" in line

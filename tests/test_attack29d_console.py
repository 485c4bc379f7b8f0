"""ATTACK29D: under user-level DP the run's length is the sum of the secret cohorts' round
durations (summary.json's wall_s is null for it, the console's final line leaves it out):
the console must not show it either."""

import io
import time

from rich.console import Console

import fedtune.cli as cli
import fedtune.sim.driver as driver
from fedtune.config import load_config

USER_DP = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=2",
           "privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
           "privacy.user.target_epsilon=50"]


def _console_of_a_run(monkeypatch, tmp_path, seconds: float) -> str:
    """The console of a user-level DP run whose rounds take `seconds` each (the simulation
    replaced: two released round records, as rounds.jsonl holds them)."""
    cfg = load_config(None, USER_DP)
    screen = Console(file=io.StringIO(), width=160, force_terminal=False, color_system=None)
    monkeypatch.setattr(cli, "console", screen)

    def fake_run(cfg, out, on_round, verbose, resume):
        for rnd in (1, 2):
            time.sleep(seconds)  # a bigger secret cohort: a longer round
            on_round({"round": rnd, "val_accuracy": 0.5, "val_loss": 0.69,
                      "epsilon_sample": None, "epsilon_user": 1.25, "clients": None,
                      "bytes_up": None, "wall_s": None})
        return {}

    monkeypatch.setattr(driver, "run_experiment", fake_run)
    cli._run_with_progress(cfg, tmp_path / "run", False, False)
    return screen.file.getvalue()


def test_the_console_says_nothing_of_the_secret_rounds_durations(monkeypatch, tmp_path):
    """Under user-level DP (cohorts secret) the console of a run is the same whatever its
    rounds took: no elapsed time (the progress bar's TimeElapsedColumn) is shown."""
    _console_of_a_run(monkeypatch, tmp_path, 0.0)  # warm: the first call imports modules
    quick = _console_of_a_run(monkeypatch, tmp_path, 0.0)
    slow = _console_of_a_run(monkeypatch, tmp_path, 1.1)
    assert "round   2" in quick  # the round lines are there
    assert quick == slow, f"the console shows how long the rounds took:\n{quick}\n{slow}"

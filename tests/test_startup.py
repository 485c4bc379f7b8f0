"""Start-up of `fedtune run`: every phase gets a progress line, the task is built while Ray
starts (its errors still reach the caller), and the untrained model's figures, now computed
after the last round instead of before round 1, are the figures a start-of-run evaluation
gives."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.runtime.startup import PREFIX, StartupReport, mark, phase, reporting
from fedtune.sim.driver import _Background
from fedtune.task.evaluation import initial_metrics, round_metrics
from fedtune.task.task import get_task
from strategies.server import _initial

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.num_clients=6", "model.max_length=32", "tuning.prompt.length=4",
        "train.eval_max_examples=48"]
LINE = re.compile(rf"^{PREFIX} (\S.*?) (\d+\.\d) s( \(.*\))? · (\d+\.\d) s since launch$")


def _cfg(*extra: str):
    return load_config(ROOT / "experiments/quickstart.toml", [*SETS, *extra])


def test_a_task_build_reports_model_data_tokenize_partitions_in_order():
    lines: list[str] = []
    # A seed no other test builds: the task is built here, not taken from the process cache.
    with reporting(StartupReport(lines.append)):
        task = get_task(_cfg("seed=4242"))
    names = [LINE.match(line).group(1) for line in lines]
    assert names == ["model", "data", "tokenize", "partitions"], lines
    assert "6 clients" in lines[-1] and f"{task.validation_rows.size:,} validation" in lines[-1]
    assert "spamassassin" in lines[1] and "rows" in lines[1]
    since = [float(LINE.match(line).group(4)) for line in lines]
    assert since == sorted(since)
    # Outside `reporting` nothing is printed and the cached task comes back.
    assert get_task(_cfg("seed=4242")) is task and len(lines) == 4


def test_phases_are_silent_without_a_report_and_a_failed_phase_is_not_reported():
    with phase("quiet"):
        pass
    mark("quiet")  # no report active: nothing to do, no error
    lines: list[str] = []
    with reporting(StartupReport(lines.append)):
        with pytest.raises(ValueError), phase("broken"):
            raise ValueError("bad")
        with phase("fine", lambda: "computed after"):
            pass
        mark("first round starts", "round 1")
    assert len(lines) == 2 and lines[0].startswith(f"{PREFIX} fine ")
    assert "(computed after)" in lines[0]
    assert lines[1].startswith(f"{PREFIX} first round starts at ") and "(round 1)" in lines[1]


def test_the_background_build_hands_back_its_value_or_its_error():
    assert _Background(lambda: 41 + 1).result() == 42

    def fail():
        raise FileNotFoundError("data.options.path='/no/such' does not exist")

    with pytest.raises(FileNotFoundError, match="no/such"):
        _Background(fail).result()


def test_workers_import_the_client_code_as_they_start(monkeypatch):
    import ray

    import fedtune.sim.driver as sim
    from fedtune.sim.warmup import import_client

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr("fedtune.runtime.interrupt.rearm", lambda: None)
    sim.start_ray(_cfg("simulation.ray_address=127.0.0.1:1"))
    hook = seen["runtime_env"]["worker_process_setup_hook"]
    assert hook == "fedtune.sim.warmup.import_client"
    module, _, name = hook.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is import_client
    # A worker that cannot import the client code starts anyway: its first message then
    # fails with the ClientApp's own error, not Ray's set-up hook error.
    monkeypatch.setitem(sys.modules, "clients.handlers", None)
    import_client()


def test_deferred_untrained_figures_equal_a_start_of_run_evaluation():
    cfg = _cfg()
    task = get_task(cfg)
    model = task.new_model()
    at_start = initial_metrics(task, model, task.initial_vector(), cfg)
    # What the server model holds at the end of a run: some trained vector.
    noise = np.random.default_rng(0).normal(size=task.spec.size).astype(np.float32)
    trained = task.initial_vector() + noise
    after_training = round_metrics(task, model, trained, cfg)
    deferred = _initial(task, model, cfg)
    for key, value in at_start.items():
        assert deferred[key] == value, key
    assert "deferred" in deferred["evaluated"]
    # The model really held the trained vector (else the check above proves nothing).
    assert after_training["val_loss"] != at_start["val_loss"]


@pytest.mark.slow
def test_a_real_run_prints_each_start_up_phase_before_the_first_round(shared_run):
    """A real run's output: the tiny quickstart run tests/test_e2e_sim.py checks too (the
    conftest `shared_run`, once per test session; a Flower simulation costs tens of
    seconds)."""
    from test_e2e_sim import shared_quickstart

    out, stdout = shared_quickstart(shared_run)
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(PREFIX)]
    names = [lines[i].split(" ")[1] for i in starts]
    # Imports and the task are built in a thread while Ray starts and the workers answer
    # discovery: their lines interleave. The task comes from the task cache when an earlier
    # test of this session built the same one.
    assert names[-1] == "first", names
    built = ["data", "tokenize", "partitions"] if "data" in names else ["task"]
    assert sorted(names[:-1]) == sorted(["imports", "ray", "workers", "model", *built]), names
    assert names.index("imports") < names.index("model") < names.index(built[0])
    first_round = next(i for i, line in enumerate(lines) if line.startswith("round   1:"))
    assert starts[-1] < first_round
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["initial_accuracy"] <= 1.0
    assert "deferred" in summary["initial_evaluated"]

"""Discovery runs while the simulation's driver still builds its task: the ServerApp asks
the workers for their partitions first and waits for the task after; a task that fails
cuts the wait short and its own error ends the run before the run folder exists."""

import threading
import time
from pathlib import Path

import pytest

from fedtune.config import load_config
from strategies.discovery import discover
from strategies.server_app import Preparation, serve
from strategies.server_entry import run_when_imported
from tests.conftest import FakeGrid

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("task_identity")


class SilentGrid(FakeGrid):
    """Nodes that are connected but never answer (workers still importing)."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.pushed_at: float | None = None

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return []


def test_discovery_stops_waiting_once_aborted():
    grid, aborted = SilentGrid([1, 2, 3]), threading.Event()
    threading.Timer(0.2, aborted.set).start()
    started = time.monotonic()
    roster = discover(grid, 3, timeout=60, abort=aborted.is_set)
    assert time.monotonic() - started < 5 and roster.nodes == {} and roster.refused == []
    # Also while nodes are still connecting.
    roster = discover(SilentGrid([1]), 3, timeout=60, wait_for_nodes_s=60, abort=lambda: True)
    assert roster.nodes == {}


def test_the_server_asks_the_workers_before_it_waits_for_the_task(tmp_path):
    cfg = load_config(ROOT / "experiments/quickstart.toml", ["data.num_clients=3",
                                                                  "train.clients_per_round=2"])
    grid, built = SilentGrid([1, 2, 3]), threading.Event()
    finished_at: list[float] = []

    def finish():
        finished_at.append(time.monotonic())
        raise FileNotFoundError("model.backbone='/no/such' does not exist")

    threading.Timer(0.3, built.set).start()  # the build fails 0.3 s in
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no/such"):
        serve(grid, cfg, tmp_path / "run", None, False, Preparation(finish, built.is_set))
    assert grid.pushed_at is not None and grid.pushed_at < finished_at[0]
    # Not the round timeout: the failed build ended the wait for the silent workers.
    assert finished_at[0] - started < 5 < cfg.train.round_timeout_s
    assert not (tmp_path / "run").exists()


def test_the_server_app_imports_its_code_only_after_the_drivers_imports(tmp_path):
    cfg = load_config(ROOT / "experiments/quickstart.toml", ["data.num_clients=3",
                                                                  "train.clients_per_round=2"])
    calls: list[str] = []

    def imported():
        calls.append("imported")

    def finish():
        calls.append("finish")
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run_when_imported(SilentGrid([1, 2, 3]), {}, cfg, tmp_path / "run", None, False,
                          Preparation(finish, lambda: True, imported))
    assert calls == ["imported", "finish"]

    def broken():
        raise ImportError("torch is broken in this install")

    # An import that failed in the driver's thread ends the run with its own error.
    with pytest.raises(ImportError, match="torch is broken"):
        run_when_imported(SilentGrid([1]), {}, cfg, tmp_path / "run", None, False,
                          Preparation(finish, lambda: True, broken))
    assert not (tmp_path / "run").exists()

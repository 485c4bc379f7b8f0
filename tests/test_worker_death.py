"""A simulation worker that Ray killed (out of memory, a crash) stays dead: Flower's actor
pool keeps it, so every later message to it fails. The server stops after that round with
its checkpoint and ledger (resumable, no summary) and one line naming the cause, instead of
playing the remaining rounds with nobody training (charging privacy budget for nothing and,
under user-level DP, adding noise to the model). Found when a 15 GB process beside two runs
made Ray kill their workers: both went on for 5 rounds with 0 clients."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message

from fedtune.config import load_config
from fedtune.runtime.worker_death import WorkerDiedError, worker_death

OOM = ("<class 'ray.exceptions.OutOfMemoryError'>:<'Task was killed due to the node running "
       "low on memory. Memory on the node (IP: 127.0.0.1) was 22.43GB / 23.54GB (0.952995), "
       + "which exceeds the memory usage threshold of 0.950000; " * 60 + "'>")
SETS = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=3",
        "train.local_steps=1", "train.batch_size=8", "model.max_length=16",
        "tuning.prompt.length=2", "train.eval_max_examples=16", "train.round_timeout_s=0.05",
        "privacy.sample.accountant=rdp"]
NODES = {0: 100, 1: 101, 2: 102}


@pytest.mark.parametrize(("reason", "death"), [
    (OOM, "OutOfMemoryError"),
    ("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly'>", "ActorDiedError"),
    # An exception inside the ClientApp: the worker lives on.
    ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'ray.exceptions."
     "OutOfMemoryError in user code'>", None),
    ("<class 'ray.exceptions.RayTaskError(ValueError)'>:<'bad'>", None),
    ("no reply within train.round_timeout_s", None),
])
def test_a_workers_death_is_told_from_other_failures(reason, death):
    assert worker_death([{"reason": reason, "node": 1, "partition_id": 0}]) == death


def test_a_long_error_reason_keeps_its_exception_class():
    """The ledger bounds a failure's text; the bound keeps the head, where Flower puts the
    exception's class, as well as the tail."""
    from strategies.delta_fedavg import MAX_REASON, _error_tail

    kept = _error_tail(OOM)
    assert len(OOM) > 2 * MAX_REASON and len(kept) < MAX_REASON + 100
    assert kept.startswith("<class 'ray.exceptions.OutOfMemoryError'>")
    assert kept.endswith(OOM[-100:])
    assert worker_death([{"reason": kept}]) == "OutOfMemoryError"


class DyingGrid:
    """Every instruction is answered by the simulation engine's error for a killed worker
    (`dying`), or never (the silent clients of a resumed run)."""

    def __init__(self, dying: bool):
        self.dying, self.pending, self.sent = dying, [], 0

    def get_node_ids(self):
        return list(NODES.values())

    def push_messages(self, messages):
        self.pending = list(messages)
        self.sent += 1
        return ["" for _ in self.pending]

    def pull_messages(self, ids):
        out = ([Message(Error(code=0, reason=OOM), reply_to=m) for m in self.pending]
               if self.dying else [])
        self.pending = []
        return out


def _serve(grid, cfg, out, simulation, monkeypatch, resume=False):
    import strategies.server as server
    from fedtune.run.ledger import NoContributionError
    from strategies.discovery import Roster

    monkeypatch.setattr(server, "is_simulation_grid", lambda g: simulation)
    try:
        return server.run_server(grid, cfg, out, resume=resume,
                                 roster=Roster(nodes=dict(NODES)))
    except NoContributionError:  # nobody ever trained: the ledger is written all the same
        return None


def test_a_dead_worker_stops_the_run_after_its_round_and_it_resumes(
        tmp_path, monkeypatch, task_identity):
    from fedtune.run.checkpoint import load_checkpoint, privacy_fingerprint
    from fedtune.run.folder import SUMMARY_FILE
    from fedtune.run.ledger import read_rounds

    cfg = load_config(None, SETS)
    out = tmp_path / "run"
    grid = DyingGrid(dying=True)
    with pytest.raises(WorkerDiedError) as caught:
        _serve(grid, cfg, out, True, monkeypatch)
    message = str(caught.value)
    assert "\n" not in message and "OutOfMemoryError" in message
    assert f"fedtune run --resume {out}" in message
    assert grid.sent == 1  # no second round was sent to the dead worker
    assert [r["round"] for r in read_rounds(out)] == [1]
    assert not (out / SUMMARY_FILE).exists()
    from fedtune.task.task import get_task

    assert load_checkpoint(out, get_task(cfg).spec.hash, privacy_fingerprint(cfg)).round == 1
    # Fresh workers (a resumed run starts a new Ray): the remaining rounds run.
    _serve(DyingGrid(dying=False), cfg, out, True, monkeypatch, resume=True)
    assert [r["round"] for r in read_rounds(out)] == [1, 2, 3]


def test_a_deployments_error_reply_never_stops_the_run(tmp_path, monkeypatch, task_identity):
    """A node's error text is its own: one that reads like a Ray worker's death stops
    nothing outside the simulation engine."""
    from fedtune.run.ledger import read_rounds

    cfg = load_config(None, SETS)
    out = tmp_path / "run"
    _serve(DyingGrid(dying=True), cfg, out, False, monkeypatch)
    assert [r["round"] for r in read_rounds(out)] == [1, 2, 3]

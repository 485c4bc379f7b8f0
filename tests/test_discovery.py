"""Discovery runs while the simulation's driver still builds its task: the ServerApp asks
the workers for their partitions first and waits for the task after; a task that fails
cuts the wait short and its own error ends the run before the run folder exists."""

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import Context, Message, MessageType, RecordDict
from inline_grid import record_keys
from torch.utils.data import TensorDataset
from wire import reply, spec_of

import strategies.delta_fedavg as delta_fedavg
from fedtune.config import load_config
from fedtune.privacy import DPHistory, epsilon_of, planned_release
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from fedtune.wire.fields import examples_in_clear, expected_keys, statement
from fedtune.wire.protocol import PartitionQuery, PartitionReply, TrainInstruction
from strategies import DeltaFedAvg
from strategies.discovery import discover, load_operator_roster
from strategies.preparation import Preparation
from strategies.privacy_ledger import PrivacyLedger
from strategies.server import serve
from strategies.server_app import run_when_imported

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
    # Well under the 60 s timeout: the abort ended the wait (5 s failed once at load 9).
    assert time.monotonic() - started < 30 and roster.nodes == {} and roster.refused == []
    # Also while nodes are still connecting.
    roster = discover(SilentGrid([1]), 3, timeout=60, wait_for_nodes_s=60, abort=lambda: True)
    assert roster.nodes == {}


def test_the_server_asks_the_workers_before_it_waits_for_the_task(tmp_path, monkeypatch):
    import strategies.server as server_app

    monkeypatch.setattr(server_app, "is_simulation_grid", lambda grid: True)  # the sim path
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
    assert finished_at[0] - started < 30 < cfg.train.round_timeout_s
    assert not (tmp_path / "run").exists()


def test_the_server_app_imports_its_code_only_after_the_drivers_imports(tmp_path, monkeypatch):
    import strategies.server as server_app

    monkeypatch.setattr(server_app, "is_simulation_grid", lambda grid: True)  # the sim path
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


# -- identity and the example counts a node declares (issues 26 #3, 27 #6) -------------------

class ClaimGrid(FakeGrid):
    """Nodes that answer the partition query with a given `PartitionReply`."""

    def __init__(self, claims):
        super().__init__(list(claims))
        self.claims, self.sent = claims, []

    def push_messages(self, messages):
        self.sent = list(messages)
        return ["" for _ in self.sent]

    def pull_messages(self, ids):
        return [Message(content=self.claims[m.metadata.dst_node_id].to_record(), reply_to=m)
                for m in self.sent]


def test_the_operator_roster_assigns_partitions_and_a_claim_cannot_take_one():
    # main: ids were self-declared and the lowest node id won: attacker node 5 took
    # partition 0 and honest node 900 was refused (issue 27 #6).
    grid = ClaimGrid({5: PartitionReply(0), 900: PartitionReply(0), 901: PartitionReply(1),
                      7: PartitionReply(1)})
    roster = discover(grid, 2, timeout=1, wait_for_nodes_s=1, assigned={900: 0, 901: 1})
    assert roster.nodes == {0: 900, 1: 901}
    refused = {r["node"]: r["reason"] for r in roster.refused}
    assert set(refused) == {5, 7}
    assert "not in the operator roster" in refused[5]
    # A registered node claiming another's partition is refused with its reason.
    grid = ClaimGrid({900: PartitionReply(1), 901: PartitionReply(1)})
    roster = discover(grid, 2, timeout=1, wait_for_nodes_s=1, assigned={900: 0, 901: 1})
    assert roster.nodes == {1: 901}
    assert "claims partition 1; the operator roster assigns it partition 0" in \
        roster.refused[0]["reason"]


def test_an_operator_roster_file_is_read_or_refused_with_a_reason(tmp_path):
    path = tmp_path / "roster.json"
    path.write_text(json.dumps({"900": 0, "901": 1}))
    assert load_operator_roster(path, 2) == {900: 0, 901: 1}
    for text, what in [('{"900": 0, "901": 0}', "more than one node"),
                       ('{"900": 2}', "not an integer in \\[0, 1\\]"),
                       ('{"x": 0}', "is not an integer"), ("[1]", "JSON object"),
                       ("{", "roster.json")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=what):
            load_operator_roster(path, 2)


def test_a_lost_reply_of_a_data_path_node_is_charged_at_its_true_example_count():
    # main: the server planned from the corpus partition's size (164 rows) although the node
    # trained on its own file (400 rows): 19-42 % below the truth (issue 26 #3).
    cfg = load_config(None, ["data.num_clients=2", "train.clients_per_round=2",
                             "train.local_epochs=1", "train.batch_size=32",
                             "privacy.sample.accountant=rdp"])
    sizes = [164, 164]
    grid = ClaimGrid({11: PartitionReply(0), 12: PartitionReply(1, own_examples=400)})
    strategy = DeltaFedAvg(spec_of(6), 2, seed=0)
    strategy.adopt(discover(grid, 2, timeout=1, wait_for_nodes_s=1), sizes)
    assert strategy.examples == {0: 164, 1: 400}
    state = ServerState(round=0, vector=np.zeros(6), spec_hash="x", initial={})
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), sizes,
                            state)
    privacy.use_example_counts(strategy.examples)
    sent = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0, 1])
    privacy.charge_sent(1, sent.partition_ids)
    # Node 12's reply is lost; node 11 answers. The charge stands as planned.
    result = strategy.aggregate_train(sent, [reply(sent.messages[0], np.ones(6), spec_of(6),
                                                   n=164)])
    assert [f["partition_id"] for f in result.outcome.failed] == [1]
    privacy.settle(1)
    assert state.client_dp[1].entries == [planned_release(cfg, 400)]
    assert state.client_dp[0].entries == [planned_release(cfg, 164)]
    truth = epsilon_of(DPHistory([planned_release(cfg, 400)]), cfg.privacy.sample.delta, "rdp")
    assert state.client_eps[1] == pytest.approx(truth)
    # A later reply of another count is refused: the count is fixed for the run.
    sent = strategy.configure_train(2, np.zeros(6, np.float32), 0.1, [1])
    result = strategy.aggregate_train(sent, [reply(sent.messages[0], np.ones(6), spec_of(6),
                                                   n=401)])
    assert "the server holds 400" in result.outcome.rejected[0]["reason"]


def test_a_node_claiming_1e7_examples_is_weighted_as_the_largest_partition_charged_in_full():
    # main: a node could claim up to 1e7 examples at discovery and take ~all the FedAvg
    # weight (164 vs 1e7: 99.998 %). Its weight is capped, its charge is not.
    cfg = load_config(None, ["data.num_clients=3", "train.clients_per_round=3",
                             "train.local_steps=5", "train.batch_size=32",
                             "privacy.sample.accountant=rdp"])
    sizes = [164, 100, 120]
    claim = 10**7
    grid = ClaimGrid({11: PartitionReply(0), 12: PartitionReply(1, own_examples=claim),
                      13: PartitionReply(2, own_examples=50)})
    strategy = DeltaFedAvg(spec_of(6), 3, seed=0)
    strategy.adopt(discover(grid, 3, timeout=1, wait_for_nodes_s=1), sizes)
    assert strategy.examples == {0: 164, 1: claim, 2: 50}
    state = ServerState(round=0, vector=np.zeros(6), spec_hash="x", initial={})
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), sizes,
                            state)
    privacy.use_example_counts(strategy.examples)
    sent = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0, 1, 2])
    msgs = sent.messages
    # Every instruction carries the count the server charges by (the client checks it).
    assert [TrainInstruction.from_record(m.content, spec_of(6)).examples for m in msgs] == \
        [164, claim, 50]
    privacy.charge_sent(1, [0, 1, 2])
    result = strategy.aggregate_train(sent, [
        reply(msgs[0], np.full(6, 1.0), spec_of(6), n=164),
        reply(msgs[1], np.full(6, 3.0), spec_of(6), n=claim),
        reply(msgs[2], np.full(6, 5.0), spec_of(6), n=50)])
    new = result.vector
    assert len(result.outcome.accepted) == 3
    # Weights 164 : 164 (capped at the largest partition) : 50, not 164 : 1e7 : 50.
    expected = (164 * 1.0 + 164 * 3.0 + 50 * 5.0) / (164 + 164 + 50)
    assert new == pytest.approx(np.full(6, expected, np.float32))
    assert state.client_dp[1].entries == [planned_release(cfg, claim)]
    assert state.client_dp[2].entries == [planned_release(cfg, 50)]


def test_a_node_reports_its_own_files_count_and_a_partition_node_builds_no_task(
        monkeypatch, tmp_path):
    import torch
    from flwr.app import Context, RecordDict
    from torch.utils.data import TensorDataset

    import clients.handlers as client_app
    import clients.node_data as node_data
    from fedtune.wire.protocol import PartitionQuery

    def no_task(*args):
        raise AssertionError("a node on a corpus partition built its task to answer")

    monkeypatch.setattr(client_app, "get_task", no_task)
    query = Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                    dst_node_id=1)

    def answer(node_config):
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                          run_config={})
        out = client_app.handle_query(query, context, cfg=load_config(None, []))
        return PartitionReply.from_record(out.content, 4)

    assert answer({"partition-id": 2}) == PartitionReply(2)
    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "a", "label": 0}\n')
    task = SimpleNamespace(backbone=SimpleNamespace(hash="h"), label_names=("a", "b"),
                           cfg=load_config(None, []))
    monkeypatch.setattr(client_app, "get_task", lambda cfg, bundle=None: task)
    monkeypatch.setattr(node_data, "_load", lambda file, task: TensorDataset(torch.zeros(37)))
    assert answer({"partition-id": 3, "data-path": str(own)}) == PartitionReply(3, 37)


def test_a_deployment_without_an_operator_roster_is_refused_before_discovery(tmp_path):
    from fedtune.deploy.address import DeployError

    cfg = load_config(ROOT / "experiments/quickstart.toml", ["data.num_clients=2",
                                                             "train.clients_per_round=2"])
    grid = ClaimGrid({5: PartitionReply(0), 900: PartitionReply(1)})  # not the sim's grid
    with pytest.raises(DeployError, match="operator roster"):
        serve(grid, cfg, tmp_path / "run", None, False, None)
    assert grid.sent == [] and not (tmp_path / "run").exists()


# Moved here from tests/test_attackb_discovery_count.py (a review's reproducers, assertions kept):
# Attack (class 3, statement = wire): a deployment node with its own data file sends its

def test_attackb_own_data_discovery_reply_is_in_the_statement(monkeypatch, tmp_path,
                                                               task_identity):
    """Every key a discovery reply carries is in the generated statement, and an exact
    example count sent in clear under DP is listed as in clear (or not sent)."""
    import clients.handlers as client_app
    import clients.node_data as node_data

    cfg = load_config(None, [])  # sample-level DP on, counts not disclosed
    assert cfg.privacy.sample.enabled and not cfg.privacy.disclose_counts
    task = SimpleNamespace(backbone=SimpleNamespace(hash="h"), label_names=("a", "b"),
                           cfg=cfg)
    monkeypatch.setattr(client_app, "get_task", lambda cfg, bundle=None: task)
    monkeypatch.setattr(node_data, "_load", lambda file, task: TensorDataset(torch.zeros(37)))
    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "a", "label": 0}\n')
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "data-path": str(own)})
    query = Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                    dst_node_id=1)
    sent = record_keys(client_app.handle_query(query, context, cfg=cfg).content)
    stated = expected_keys(cfg)["discovery reply"]
    assert sent <= stated, (f"discovery reply carries {sorted(sent - stated)} (the node's "
                            f"exact example count, 37) beyond the statement {sorted(stated)}; "
                            f"statement: {statement(cfg)}")
    assert "roster.own-examples" not in sent or examples_in_clear(cfg), (
        "an exact example count leaves in clear under DP but examples_in_clear is empty")


def test_a_count_the_ledger_refuses_takes_its_node_out_of_the_run_with_its_reason(
        monkeypatch):
    """A resume whose discovery hears another count than the run fixed (FIX29L, ATTACK29C 6):
    that node is refused (one line in run.log, its reason in the refused claims), never
    sampled or charged; the others train on their fixed counts."""
    cfg = load_config(None, ["data.num_clients=3", "train.clients_per_round=3",
                             "train.local_steps=5", "train.batch_size=32",
                             "privacy.sample.accountant=rdp"])
    sizes = [164, 100, 120]
    state = ServerState(round=2, vector=np.zeros(6), spec_hash="x", initial={},
                        examples={0: 164, 1: 300, 2: 120})  # the first discovery's
    grid = ClaimGrid({11: PartitionReply(0), 12: PartitionReply(1, own_examples=4000),
                      13: PartitionReply(2)})
    strategy = DeltaFedAvg(spec_of(6), 3, seed=0)
    strategy.adopt(discover(grid, 3, timeout=1, wait_for_nodes_s=1), sizes)
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), sizes, state)
    # Flower's logger may not propagate once another test configured logging: the line is
    # read where it is made.
    lines = []
    monkeypatch.setattr(delta_fedavg, "log", lambda level, msg, *args: lines.append(msg % args))
    strategy.refuse(privacy.use_example_counts(strategy.examples))
    assert strategy.partitions() == [0, 2] and 1 not in strategy.examples
    [claim] = strategy.refused_claims
    assert claim["node"] == 12 and "reports 4000 examples" in claim["reason"]
    assert "fixed 300" in claim["reason"]
    assert [line for line in lines if "node 12" in line] == [
        f"node 12 {claim['reason']}; it takes no part in this run"]
    assert state.examples == {0: 164, 1: 300, 2: 120}
    assert sorted(strategy.sample(3, grid)) == [0, 2]


def test_a_nodes_report_equal_to_its_partitions_size_reaches_the_ledger_as_a_claim():
    # ATTACK29G: the ledger told a claim from the operator's data by its value alone, so a
    # node reporting exactly its corpus partition's size skipped the claim checks. Discovery
    # now says which counts a node reported (`DeltaFedAvg.claimed`), whatever their value.
    cfg = load_config(None, ["data.num_clients=2", "train.clients_per_round=2",
                             "train.local_steps=5", "train.batch_size=16", "train.rounds=10",
                             "privacy.sample.accountant=rdp",
                             "privacy.sample.noise_multiplier=1.0",
                             "privacy.sample.target_epsilon=8"])
    sizes = [400, 32]  # partition 1: q = 1/2, 50 steps at sigma 1: far past epsilon 8
    grid = ClaimGrid({11: PartitionReply(0), 12: PartitionReply(1, own_examples=32)})
    strategy = DeltaFedAvg(spec_of(6), 2, seed=0)
    strategy.adopt(discover(grid, 2, timeout=1, wait_for_nodes_s=1), sizes)
    assert strategy.examples == {0: 400, 1: 32} and strategy.claimed == {1}
    state = ServerState(round=0, vector=np.zeros(6), spec_hash="x", initial={})
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), sizes, state)
    refused = privacy.use_example_counts(strategy.examples, strategy.claimed)
    assert set(refused) == {1} and "over privacy.sample.target_epsilon" in refused[1]
    strategy.refuse(refused)
    assert strategy.partitions() == [0]

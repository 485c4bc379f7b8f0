"""Attack (THREATS.md class 2): a deployment node with its own data file never releases more
than the server charges it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from torch.utils.data import TensorDataset

from fedtune.config import load_config
from fedtune.wire.protocol import PartitionQuery, PartitionReply


class Trained(Exception):
    pass


def test_an_own_data_node_never_trains_on_another_count_than_it_reported(
        monkeypatch, tmp_path, task_identity):
    """The count a node reports at discovery is the one it trains on (the server charges by it)."""
    import clients.handlers as client_app
    import clients.node_data as node_data

    cfg = load_config(None, ["privacy.sample.noise_multiplier=1.0"])
    task = SimpleNamespace(backbone=SimpleNamespace(hash="h"), label_names=("a", "b"), cfg=cfg,
                           spec=SimpleNamespace(hash="s", unflatten=lambda v: {}))
    monkeypatch.setattr(client_app, "get_task", lambda cfg, bundle=None: task)
    rows = {"n": 1000}
    monkeypatch.setattr(node_data, "_load",
                        lambda file, task: TensorDataset(torch.zeros(rows["n"])))
    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "a", "label": 0}\n')
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "data-path": str(own)})
    query = Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                    dst_node_id=1)
    reply = client_app.handle_query(query, context, cfg=cfg)
    assert PartitionReply.from_record(reply.content, 4).own_examples == 1000

    # The operator's file changes between discovery and round 1 (rows removed).
    own.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    rows["n"] = 50
    trained_on = []

    def local_train(model, data, *args, **kwargs):
        trained_on.append(len(data))
        raise Trained

    monkeypatch.setattr(client_app, "local_train", local_train)
    monkeypatch.setattr(client_app, "worker_model",
                        lambda task, device: SimpleNamespace(load_trainable=lambda tensors: None))
    # The server sends back the count it fixed at discovery (and charges by).
    order = SimpleNamespace(vector=np.zeros(1, np.float32), server_round=1, lr=None,
                            clip_norm=None, dp_history=None, prune=None, domain=None,
                            withhold_metrics=False, examples=1000)
    monkeypatch.setattr(client_app.TrainInstruction, "from_record",
                        classmethod(lambda cls, content, spec: order))
    train = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1)
    answer = None
    try:
        answer = client_app.handle_train(train, context, cfg)
    except Trained:
        pass
    # The server charges planned_release(cfg, 1000) (q = 1/32); training on 50 rows
    # releases at q = 1/2 with the same sigma: far more epsilon than charged.
    assert trained_on in ([], [1000]), f"trained on {trained_on} rows after reporting 1000"
    # The refusal is an error reply, one line naming both counts.
    assert answer is not None and answer.has_error()
    assert "holds 50 training examples" in answer.error.reason
    assert "charges it for 1000" in answer.error.reason

    # An instruction without the server's count is refused too (own data file) ...
    order.examples = None
    answer = client_app.handle_train(train, context, cfg)
    assert trained_on == [] and answer.has_error() and "no example count" in answer.error.reason
    # ... and the count the server holds is trained on.
    order.examples = 50
    try:
        client_app.handle_train(train, context, cfg)
    except Trained:
        pass
    assert trained_on == [50]


def test_reproducible_mode_charges_a_lost_attempts_client_the_replay_leaves_out(tmp_path):
    """Seeded noise: a client asked in a killed attempt but not in its replay is still charged."""
    from fedtune.privacy.plan import PrivacyPlan
    from fedtune.run.checkpoint import ServerState
    from strategies.privacy_ledger import PrivacyLedger

    sets = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=4",
            "train.local_steps=5", "train.batch_size=32", "privacy.sample.accountant=rdp",
            "privacy.reproducible_noise=true"]
    cfg = load_config(None, sets)
    task = SimpleNamespace(partitions=[np.arange(n) for n in (100, 70, 40)])

    def fresh():
        return ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})

    sizes = [len(p) for p in task.partitions]
    PrivacyLedger(PrivacyPlan.of(cfg), sizes, fresh(), tmp_path).charge_sent(1, [0, 1])  # kill -9
    # The resume replays round 1 with another cohort (e.g. a node missed discovery this time,
    # so the seeded sample is drawn from another roster): client 1's upload went out once.
    state = fresh()
    resumed = PrivacyLedger(PrivacyPlan.of(cfg), sizes, state, tmp_path)
    resumed.charge_sent(1, [0, 2])
    resumed.settle(1)
    assert state.client_eps.get(1, 0.0) > 0.0, "client 1 released in the lost attempt, uncharged"

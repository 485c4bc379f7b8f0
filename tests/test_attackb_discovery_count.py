"""Attack (class 3, statement = wire): a deployment node with its own data file sends its
exact example count in clear at discovery (`roster.own-examples`), under sample-level DP
too, but the generated statement's discovery reply lists only the partition id and
`examples_in_clear` says no count leaves under DP."""

from types import SimpleNamespace

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from inline_grid import record_keys
from torch.utils.data import TensorDataset

from fedtune.config import load_config
from fedtune.wire.fields import examples_in_clear, expected_keys, statement
from fedtune.wire.protocol import PartitionQuery


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

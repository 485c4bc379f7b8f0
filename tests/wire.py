"""Messages built in-process, as a ServerApp sends and a ClientApp answers them (no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.wire.delta import DeltaSpec, encode
from fedtune.wire.protocol import TrainReply, TrainReport


def spec_of(size: int) -> DeltaSpec:
    return DeltaSpec.from_state({"w": torch.zeros(size)}, "bb", {"m": 1})


def honest_metrics(n: int = 10, loss: float = 1.0) -> dict[str, Any]:
    """What an honest client without DP-SGD or plugins reports, on the wire."""
    return {"num-examples": n, "loss": loss, "steps": 2, "examples-seen": 2 * n,
            "flops": 10.0}


def reply(msg: Message, delta, spec: DeltaSpec, n: int = 10, loss: float = 1.0) -> Message:
    """An honest client's reply, built through the protocol."""
    report = TrainReport(steps=2, num_examples=n, loss=loss, examples_seen=2 * n, flops=10.0)
    built = TrainReply.build(np.asarray(delta, np.float32), spec.hash, report)
    return Message(content=built.to_record(), reply_to=msg)


def raw_reply(msg: Message, delta, spec_hash: str, metrics: dict[str, Any],
              extra_arrays: dict[str, ArrayRecord] | None = None) -> Message:
    """A reply as a hostile client may shape it: any metrics, any extra records."""
    content = RecordDict({
        "delta": ArrayRecord({"vector": encode(np.asarray(delta, np.float32))}),
        **(extra_arrays or {}),
        "metrics": MetricRecord(metrics),
        "info": ConfigRecord({"spec-hash": spec_hash}),
    })
    return Message(content=content, reply_to=msg)


def stray_message(node: int) -> Message:
    """A server message to `node`, to answer from a node that was not asked."""
    return Message(content=RecordDict({"config": ConfigRecord({})}),
                   message_type=MessageType.TRAIN, dst_node_id=node)

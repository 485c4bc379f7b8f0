"""Discovery: which node holds which partition, asked of every node once per run.

Flower draws node ids at random in every run, so the server asks each node for its
partition id (one small QUERY message each) and binds each partition to the first node
that claims it; a second claim is refused for that node only. Discovery needs no task, so
the simulation runs it while the driver is still building its task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.protocol import PartitionQuery, PartitionReply, ProtocolError
from strategies.grid_io import send_and_receive


@dataclass
class Roster:
    """Partition id -> node id, and the claims refused (node, reason)."""

    nodes: dict[int, int] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)


def discover(grid: Grid, num_partitions: int, timeout: float, wait_for_nodes_s: float = 120.0,
             abort: Callable[[], bool] | None = None) -> Roster:
    """Wait for `num_partitions` nodes to connect, ask each for its partition and bind the
    claims in node order (not arrival order: which claim is first must not depend on
    timing). `abort()` returning True ends the waiting early with what arrived (the
    caller's own failure then says why)."""
    stop = abort or (lambda: False)
    deadline = time.monotonic() + wait_for_nodes_s
    while len(nodes := sorted(grid.get_node_ids())) < num_partitions:
        if stop():
            return Roster()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {num_partitions} nodes connected after "
                f"{wait_for_nodes_s:.0f} s (data.num_clients)")
        time.sleep(0.5)
    queries = [Message(content=PartitionQuery().to_record(),
                       message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = send_and_receive(grid, queries, timeout, abort=stop)
    replies.sort(key=lambda m: m.metadata.src_node_id)
    roster = Roster()
    for reply in replies:
        node = reply.metadata.src_node_id
        reason = None
        if reply.has_error():
            reason = f"did not report its partition: {reply.error.reason}"
        elif node not in nodes or node in roster.nodes.values():
            reason = "replied although not asked, or twice"
        else:
            try:
                pid = PartitionReply.from_record(reply.content, num_partitions).partition_id
            except ProtocolError as exc:
                reason = f"sent a bad partition reply: {exc}"
            else:
                if pid in roster.nodes:
                    reason = f"claims partition {pid}, already held by node {roster.nodes[pid]}"
                else:
                    roster.nodes[pid] = node
        if reason is not None:
            log(WARNING, "node %d %s; it takes no part in this run", node, reason)
            roster.refused.append({"node": node, "reason": reason})
    return roster

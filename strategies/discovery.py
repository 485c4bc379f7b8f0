"""Discovery: which node holds which partition, asked of every node once per run.

Flower draws node ids at random in every run, so the server asks each node for its
partition id (one small QUERY message each). Who may hold a partition is the server's
decision, never a node's claim:

- in simulation the engine writes `partition-id` into each node's config, so a claim is
  what the engine assigned (a second claim on a partition is refused for that node only);
- in a deployment the operator's roster (`load_operator_roster`: registered node id ->
  partition id) assigns them: a node outside the roster, or one claiming a partition it was
  not assigned, is refused with its reason in the ledger.
A node training on its own data file also reports that file's example count here, once
(bounded by the protocol); the server fixes its weight and DP plan by it for the run.
Discovery needs no task, so the simulation runs it while the driver still builds its task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.wire.protocol import PartitionQuery, PartitionReply, ProtocolError, bounded
from strategies.grid_io import send_and_receive


@dataclass
class Roster:
    """Partition id -> node id, the example counts of the partitions whose node trains on
    its own data file (partition id -> count, as reported once at discovery), and the
    claims refused (node, reason)."""

    nodes: dict[int, int] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)
    own_examples: dict[int, int] = field(default_factory=dict)


def load_operator_roster(path: str | Path, num_partitions: int) -> dict[int, int]:
    """A deployment's operator roster: a JSON object mapping each registered node id (what
    `flwr supernode register` prints) to the partition id it holds, e.g.
    `{"4216743820": 0, "99812356": 1}`. Raises ValueError naming what is wrong."""
    where = f"operator roster {path}"
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {bounded(exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: expected a non-empty JSON object of node id -> partition id")
    assigned: dict[int, int] = {}
    for key, pid in raw.items():
        try:
            node = int(key)
        except ValueError:
            raise ValueError(f"{where}: node id {bounded(key, 40)!r} is not an integer") \
                from None
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < num_partitions:
            raise ValueError(f"{where}: node {node}'s partition {bounded(pid, 40)!r} is not an "
                             f"integer in [0, {num_partitions - 1}] (data.num_clients)")
        assigned[node] = pid
    taken = [p for p in set(assigned.values()) if list(assigned.values()).count(p) > 1]
    if taken:
        raise ValueError(f"{where}: partitions {sorted(taken)[:5]} are assigned to more than "
                         "one node")
    return assigned


def discover(grid: Grid, num_partitions: int, timeout: float, wait_for_nodes_s: float = 120.0,
             abort: Callable[[], bool] | None = None,
             assigned: Mapping[int, int] | None = None,
             pause: float | None = None) -> Roster:
    """Wait for `num_partitions` nodes to connect, ask each for its partition and bind the
    claims in node order (not arrival order: which claim is first must not depend on
    timing). With `assigned` (the operator roster, node id -> partition id) a node binds
    only the partition it was assigned. `abort()` returning True ends the waiting early
    with what arrived (the caller's own failure then says why). `pause`: seconds between
    pulls for the replies (strategies.grid_io.poll_interval)."""
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
    replies = send_and_receive(grid, queries, timeout, abort=stop, pause=pause)
    replies.sort(key=lambda m: m.metadata.src_node_id)
    roster = Roster()
    for reply in replies:
        node = reply.metadata.src_node_id
        reason = None
        if reply.has_error():
            reason = f"did not report its partition: {bounded(reply.error.reason)}"
        elif node not in nodes or node in roster.nodes.values():
            reason = "replied although not asked, or twice"
        elif assigned is not None and node not in assigned:
            reason = "is not in the operator roster"
        else:
            try:
                claim = PartitionReply.from_record(reply.content, num_partitions)
            except ProtocolError as exc:
                reason = f"sent a bad partition reply: {bounded(exc)}"
            else:
                reason = _bind(roster, node, claim, assigned)
        if reason is not None:
            log(WARNING, "node %d %s; it takes no part in this run", node, reason)
            roster.refused.append({"node": node, "reason": reason})
    return roster


def _bind(roster: Roster, node: int, claim: PartitionReply,
          assigned: Mapping[int, int] | None) -> str | None:
    """Bind `node` to its claimed partition, or say why not."""
    pid = claim.partition_id
    if assigned is not None and assigned[node] != pid:
        return f"claims partition {pid}; the operator roster assigns it partition {assigned[node]}"
    if pid in roster.nodes:
        return f"claims partition {pid}, already held by node {roster.nodes[pid]}"
    roster.nodes[pid] = node
    if claim.own_examples is not None:
        roster.own_examples[pid] = claim.own_examples
    return None

"""FedAvg over delta vectors: the server sends one flat global vector, clients reply with
`local - global`, and the example-weighted mean delta is added to the global vector.

Each reply is decoded and validated (spec hash, length, dtype, finiteness) before it can
count; a bad one is recorded as rejected, never averaged in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtune.delta import DeltaError, DeltaSpec, array_bytes, decode, encode


@dataclass
class RoundOutcome:
    """What one round's aggregation saw, for the ledger."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0


class DeltaFedAvg(FedAvg):
    def __init__(self, spec: DeltaSpec, clients_per_round: int, seed: int,
                 wait_for_nodes_s: float = 120.0) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0,
                         min_train_nodes=clients_per_round,
                         min_available_nodes=clients_per_round)
        self.spec = spec
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.wait_for_nodes_s = wait_for_nodes_s
        self.outcome = RoundOutcome()
        self._global: np.ndarray | None = None
        # partition-id -> node id. Flower draws node ids at random in every run, so a
        # cohort is drawn over partition ids and mapped to nodes through this roster.
        self.roster: dict[int, int] = {}
        # Extra config entries for one client's task, by partition id (e.g. its DP history).
        self.client_config: Callable[[int], dict[str, Any]] = lambda pid: {}

    def summary(self) -> None:
        log(INFO, "DeltaFedAvg: %d clients/round, spec %s (%d values)",
            self.clients_per_round, self.spec.hash, self.spec.size)

    # -- sampling

    def discover(self, grid: Grid, num_partitions: int, timeout: float) -> dict[int, int]:
        """Ask every node for its partition id (one small QUERY message each)."""
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(nodes := sorted(grid.get_node_ids())) < num_partitions:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {num_partitions} nodes connected after "
                    f"{self.wait_for_nodes_s:.0f} s (data.num_clients)")
            time.sleep(0.5)
        queries = [Message(content=RecordDict({"config": ConfigRecord({})}),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        roster: dict[int, int] = {}
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error():
                log(WARNING, "node %d did not report its partition: %s",
                    reply.metadata.src_node_id, reply.error.reason)
                continue
            pid = int(reply.content["roster"]["partition-id"])
            if pid in roster:
                raise RuntimeError(f"partition {pid} is claimed by nodes {roster[pid]} and "
                                   f"{reply.metadata.src_node_id}")
            roster[pid] = reply.metadata.src_node_id
        self.roster = roster
        return roster

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """A seeded cohort: the same seed gives the same partitions in every re-run."""
        if not self.roster:
            self.roster = {i: n for i, n in enumerate(sorted(grid.get_node_ids()))}
        if len(self.roster) < self.clients_per_round:
            raise RuntimeError(f"only {len(self.roster)} clients available; "
                               f"train.clients_per_round needs {self.clients_per_round}")
        rng = random.Random(self.seed * 7919 + server_round)
        chosen = rng.sample(sorted(self.roster), self.clients_per_round)
        return [self.roster[pid] for pid in chosen]

    # -- train

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = decode(arrays["vector"], self.spec)
        config["server-round"] = server_round
        config["spec-hash"] = self.spec.hash
        nodes = self.sample(server_round, grid)
        partition_of = {node: pid for pid, node in self.roster.items()}
        messages = []
        for node in nodes:
            node_config = ConfigRecord({**config, **self.client_config(partition_of[node])})
            record = RecordDict({"global": arrays, "config": node_config})
            messages.append(Message(content=record, message_type=MessageType.TRAIN,
                                    dst_node_id=node))
        self.outcome = RoundOutcome(sampled=nodes,
                                    bytes_down=sum(array_bytes(m.content) for m in messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        accepted: list[tuple[int, np.ndarray, float]] = []
        partition_of = {node: pid for pid, node in self.roster.items()}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.outcome.failed.append({"node": node, "partition_id": partition_of.get(node),
                                            "reason": msg.error.reason})
                continue
            self.outcome.bytes_up += array_bytes(msg.content)
            try:
                delta, metrics = self._validated(msg)
            except DeltaError as exc:
                log(WARNING, "round %d: rejected delta from node %d: %s", server_round, node,
                    exc)
                # Keep what it reported: a rejected client still spent privacy budget.
                reported = msg.content.metric_records.get("metrics")
                self.outcome.rejected.append({"node": node, "reason": str(exc),
                                              **(_plain(reported) if reported else {})})
                continue
            accepted.append((node, delta, float(metrics["num-examples"])))
            self.outcome.accepted.append({"node": node, "bytes_up": array_bytes(msg.content),
                                          **_plain(metrics)})
        seen = {c["node"] for c in
                self.outcome.accepted + self.outcome.rejected + self.outcome.failed}
        for node in self.outcome.sampled:
            if node not in seen:
                self.outcome.failed.append({"node": node, "partition_id": partition_of.get(node),
                                            "reason": "no reply within train.round_timeout_s"})
        # Replies arrive in completion order; sum in a fixed order so a re-run with the
        # same seed gives bit-identical global vectors.
        accepted.sort(key=lambda item: partition_of.get(item[0], item[0]))
        self.outcome.accepted.sort(key=lambda c: partition_of.get(c["node"], c["node"]))
        deltas = [d for _, d, _ in accepted]
        weights = [w for _, _, w in accepted]
        if not deltas:
            return None, None
        w = np.asarray(weights, dtype=np.float64)
        mean_delta = (np.stack(deltas).astype(np.float64) * (w / w.sum())[:, None]).sum(0)
        new_global = (self._global + mean_delta).astype(np.float32)
        metrics = MetricRecord({
            "num-examples": int(w.sum()),
            "loss": float(np.average([a["loss"] for a in self.outcome.accepted], weights=w)),
        })
        return ArrayRecord({"vector": encode(new_global)}), metrics

    def _validated(self, msg: Message) -> tuple[np.ndarray, MetricRecord]:
        content = msg.content
        info = content.config_records.get("info")
        if info is None or info.get("spec-hash") != self.spec.hash:
            got = None if info is None else info.get("spec-hash")
            raise DeltaError(f"spec hash {got!r} does not match the server's {self.spec.hash}")
        if "delta" not in content.array_records or "vector" not in content["delta"]:
            raise DeltaError("reply carries no 'delta' array record with a 'vector'")
        if len(content.array_records) != 1 or len(content["delta"]) != 1:
            raise DeltaError("reply carries arrays besides the delta vector")
        metrics = content.metric_records.get("metrics")
        if metrics is None or "num-examples" not in metrics:
            raise DeltaError("reply carries no metrics with 'num-examples'")
        if not float(metrics["num-examples"]) > 0:
            raise DeltaError(f"num-examples must be > 0, got {metrics['num-examples']}")
        return decode(content["delta"]["vector"], self.spec), metrics


def _plain(metrics: MetricRecord) -> dict:
    return {k.replace("-", "_"): v for k, v in metrics.items()}

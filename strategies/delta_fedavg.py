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
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtune.delta import DeltaError, DeltaSpec, array_bytes, decode, encode
from strategies.grid_io import send_and_receive


@dataclass
class RoundOutcome:
    """What one round's aggregation saw, for the ledger."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    # Norms of the deltas that entered a user-level-DP sum (after clipping).
    aggregated_norms: list[float] = field(default_factory=list)


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
        # Plugins' say over the sampled partition ids (round, pids) -> pids.
        self.select_cohort: Callable[[int, list[int]], list[int]] = lambda rnd, pids: pids
        # Plugins' factor in [0, 1] on a client's delta, (round, pid) -> weight.
        self.client_weight: Callable[[int, int], float] = lambda rnd, pid: 1.0
        # User-level DP: Poisson sampling at this rate, and a mean over this many clients.
        self.poisson_rate: float | None = None
        self.fixed_denominator: int | None = None

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
        for reply in send_and_receive(grid, queries, timeout):
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
        """A seeded cohort: the same seed gives the same partitions in every re-run. With
        `poisson_rate` set, each client joins independently with that probability (the
        cohort size varies); otherwise exactly `clients_per_round` are drawn."""
        if not self.roster:
            self.roster = {i: n for i, n in enumerate(sorted(grid.get_node_ids()))}
        if len(self.roster) < self.clients_per_round:
            raise RuntimeError(f"only {len(self.roster)} clients available; "
                               f"train.clients_per_round needs {self.clients_per_round}")
        rng = random.Random(self.seed * 7919 + server_round)
        if self.poisson_rate is not None:
            chosen = [pid for pid in sorted(self.roster) if rng.random() < self.poisson_rate]
        else:
            chosen = rng.sample(sorted(self.roster), self.clients_per_round)
        return [self.roster[pid] for pid in self.select_cohort(server_round, chosen)]

    # -- train

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # A DP wrapper hands the global vector on as a plain numpy array; clients always
        # get it in the delta codec.
        self._global = as_vector(arrays["vector"], self.spec)
        wire = ArrayRecord({"vector": encode(self._global)})
        config["server-round"] = server_round
        config["spec-hash"] = self.spec.hash
        nodes = self.sample(server_round, grid)
        partition_of = {node: pid for pid, node in self.roster.items()}
        messages = []
        for node in nodes:
            node_config = ConfigRecord({**config, **self.client_config(partition_of[node])})
            record = RecordDict({"global": wire, "config": node_config})
            messages.append(Message(content=record, message_type=MessageType.TRAIN,
                                    dst_node_id=node))
        self.outcome = RoundOutcome(sampled=nodes,
                                    bytes_down=sum(array_bytes(m.content) for m in messages))
        return messages

    def screen(self, server_round: int, replies: Iterable[Message]
               ) -> list[tuple[Message, np.ndarray]]:
        """Validate every reply; record failures, rejections and silent clients in
        `outcome`; return the accepted (reply, delta) pairs in partition order."""
        if self._global is None:
            raise RuntimeError("screen called before configure_train")
        accepted: list[tuple[Message, np.ndarray]] = []
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
                self.reject(server_round, msg, str(exc))
                continue
            accepted.append((msg, delta))
            self.outcome.accepted.append({
                "node": node, "bytes_up": array_bytes(msg.content),
                "delta_norm": float(np.linalg.norm(delta)),
                "weight": self.client_weight(server_round, partition_of.get(node, -1)),
                **_plain(metrics)})
        seen = {c["node"] for c in
                self.outcome.accepted + self.outcome.rejected + self.outcome.failed}
        for node in self.outcome.sampled:
            if node not in seen:
                self.outcome.failed.append({"node": node, "partition_id": partition_of.get(node),
                                            "reason": "no reply within train.round_timeout_s"})
        # Replies arrive in completion order; sum in a fixed order so a re-run with the
        # same seed gives bit-identical global vectors.
        def order(node: int) -> int:
            return partition_of.get(node, node)

        accepted.sort(key=lambda item: order(item[0].metadata.src_node_id))
        self.outcome.accepted.sort(key=lambda c: order(c["node"]))
        return accepted

    def reject(self, server_round: int, msg: Message, reason: str) -> None:
        """Leave a reply out of aggregation, keeping what it reported: a rejected client
        still spent privacy budget."""
        node = msg.metadata.src_node_id
        log(WARNING, "round %d: rejected delta from node %d: %s", server_round, node, reason)
        reported = msg.content.metric_records.get("metrics")
        self.outcome.rejected.append({"node": node, "reason": reason,
                                      **(_plain(reported) if reported else {})})
        self.outcome.accepted = [c for c in self.outcome.accepted if c["node"] != node]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        if self.fixed_denominator is not None:
            return self._aggregate_clipped(list(replies))
        accepted = self.screen(server_round, replies)
        if not accepted:
            return None, None
        w = np.asarray([c["num_examples"] * c["weight"] for c in self.outcome.accepted],
                       dtype=np.float64)
        if not w.sum() > 0:  # every client weighted 0: nothing to move the model by
            return None, None
        deltas = np.stack([d for _, d in accepted]).astype(np.float64)
        mean_delta = (deltas * (w / w.sum())[:, None]).sum(0)
        new_global = (self._global + mean_delta).astype(np.float32)
        return ArrayRecord({"vector": encode(new_global)}), self._metrics(w)

    def _aggregate_clipped(self, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """User-level DP: replies were screened, then clipped by the DP wrapper, and carry
        `global + clipped delta` as float64. Every client weighs the same and the sum is
        divided by the expected cohort, not by how many replied, so one client moves the
        mean by at most clip_norm / cohort whoever else fails."""
        if not replies:
            return None, None
        base = self._global.astype(np.float64)
        deltas = np.stack([m.content["delta"]["vector"].numpy() - base for m in replies])
        self.outcome.aggregated_norms = [float(np.linalg.norm(d)) for d in deltas]
        new_global = base + deltas.sum(0) / self.fixed_denominator
        w = np.ones(len(replies))
        return ArrayRecord({"vector": Array(new_global)}), self._metrics(w)

    def _metrics(self, weights: np.ndarray) -> MetricRecord:
        return MetricRecord({
            "num-examples": int(sum(c["num_examples"] for c in self.outcome.accepted)),
            "loss": float(np.average([c["loss"] for c in self.outcome.accepted],
                                     weights=weights)),
        })

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


def as_vector(array: Array, spec: DeltaSpec) -> np.ndarray:
    """The float32 global vector from the delta codec or from a plain numpy Array."""
    if array.stype == "numpy.ndarray":
        flat = np.asarray(array.numpy(), dtype=np.float32)
        spec.check_vector(flat)
        return flat
    return decode(array, spec)


def _plain(metrics: MetricRecord) -> dict:
    return {k.replace("-", "_"): v for k, v in metrics.items()}

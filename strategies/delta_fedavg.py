"""FedAvg over delta vectors: the server sends one flat global vector, clients reply with
`local - global`, and the example-weighted mean delta is added to the global vector.

The weights are the server's: a partition's example count as the server knows it (its
partition size, or the count a node with its own data file reported once at discovery,
capped at the largest corpus partition so one node's claim cannot take the aggregate),
times the plugins' weight; never a count from a reply. The count goes out in every train
instruction (the client refuses to train on another); a reply reporting another count than
the server holds is rejected.

Every reply passes the wire protocol (`fedtune.wire.protocol`) and the delta codec before it can
count; a bad one is recorded as rejected with its reason, never averaged in, and never
raises. The ledger entry of a client is built from what it reported first and the fields
the server owns last, so no reply can set a server-owned field.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.config import AggregationConfig
from fedtune.privacy import DPHistory
from fedtune.wire.delta import DeltaError, DeltaSpec, array_bytes, encode
from fedtune.wire.protocol import (
    ProtocolError,
    TrainInstruction,
    TrainReply,
    bounded,
    check_plugin_fields,
)
from strategies import robust
from strategies.discovery import Roster


@dataclass
class RoundOutcome:
    """What one round's aggregation saw, for the ledger. Every entry of `sampled`,
    `accepted`, `rejected` and `failed` carries the server's `partition_id` and `node`."""

    sampled: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    # Replies from nodes that were not asked to train this round (or replied twice).
    unsolicited: list[dict[str, Any]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    # Norms of the deltas that entered a user-level-DP sum (after clipping and weighting).
    aggregated_norms: list[float] = field(default_factory=list)
    # True when no client's delta moved the aggregate this round.
    no_contribution: bool = True
    # Why the round's aggregate was not applied although clients contributed, if so.
    update_refused: str | None = None
    # The aggregation rule that ran and its figures (strategies.robust), if one ran.
    aggregation: dict[str, Any] | None = None


@dataclass
class Accepted:
    """A reply that passed every check: its partition, node and decoded delta."""

    partition_id: int
    node: int
    delta: np.ndarray
    entry: dict[str, Any]


class DeltaFedAvg:
    def __init__(self, spec: DeltaSpec, clients_per_round: int, seed: int) -> None:
        self.spec = spec
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.outcome = RoundOutcome()
        self.global_vector: np.ndarray | None = None
        self._asked: dict[int, int] = {}  # node -> partition id, this round
        # partition-id -> node id, bound at discovery. Flower draws node ids at random in
        # every run, so a cohort is drawn over partition ids and mapped through this roster.
        self.roster: dict[int, int] = {}
        # partition-id -> the examples the server weights it by and plans its DP charges
        # from (`adopt`). A roster set without counts (a strategy driven alone, in tests)
        # weights every client equally.
        self.examples: dict[int, int] = {}
        # The most examples one client's weight counts (`adopt`: the largest corpus
        # partition). A node with its own file may report up to MAX_NODE_EXAMPLES; it is
        # charged by its true count, but weighted no heavier than the largest partition.
        self.weight_cap: int | None = None
        # Claims refused at discovery (a partition another node already holds).
        self.refused_claims: list[dict[str, Any]] = []
        # The DP-SGD history the server holds for a partition, sent with its instruction.
        self.dp_history: Callable[[int], DPHistory | None] = lambda pid: None
        # Plugins' instruction fields for a partition, (round, pid) -> {field: settings}.
        self.plugin_settings: Callable[[int, int], dict[str, Any]] = lambda rnd, pid: {}
        # Plugins' say over the sampled partition ids (round, pids) -> pids.
        self.select_cohort: Callable[[int, list[int]], list[int]] = lambda rnd, pids: pids
        # Plugins' factor in [0, 1] on a client's delta, (round, pid) -> weight.
        self.client_weight: Callable[[int, int], float] = lambda rnd, pid: 1.0
        # Set by the user-level DP wrapper: client-side clipping's norm, and replies that
        # carry only what the server needs.
        self.clip_norm: float | None = None
        self.withhold_metrics = False
        # The rule that combines the deltas (`[aggregation]`); the default is FedAvg.
        self.aggregation = AggregationConfig()

    def summary(self) -> None:
        log(INFO, "DeltaFedAvg: %d clients/round, spec %s (%d values)",
            self.clients_per_round, self.spec.hash, self.spec.size)

    # -- discovery and sampling

    def adopt(self, roster: Roster, sizes: Sequence[int] | None = None) -> dict[int, int]:
        """Take the roster discovery bound (`strategies.discovery`); its refused claims go to
        the next ledger line. `sizes`: the corpus partitions' sizes (`task.partitions`), the
        example count of every partition whose node trains on it; a node with its own data
        file counts what it reported at discovery."""
        self.roster = dict(roster.nodes)
        self.refused_claims = list(roster.refused)
        if sizes is not None:
            self.examples = {pid: roster.own_examples.get(pid, int(sizes[pid]))
                             for pid in self.roster}
            self.weight_cap = max([1, *(int(n) for n in sizes)])
        return self.roster

    def require_roster(self) -> None:
        if not self.roster:
            raise RuntimeError("no partition has a node: discovery bound none (see the refused "
                               "claims), so no round can be sampled")

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """A seeded cohort of `clients_per_round` partition ids: the same seed gives the same
        partitions in every re-run. With fewer partitions bound at discovery (a node refused
        or silent), all of them."""
        self.require_roster()
        size = min(self.clients_per_round, len(self.roster))
        if size < self.clients_per_round:
            log(WARNING, "round %d: only %d partitions have a node; the cohort is %d, not "
                "train.clients_per_round=%d", server_round, size, size, self.clients_per_round)
        rng = random.Random(self.seed * 7919 + server_round)
        chosen = rng.sample(sorted(self.roster), size)
        return self.select_cohort(server_round, chosen)

    # -- train

    def configure_train(self, server_round: int, vector: np.ndarray, lr: float,
                        cohort: list[int]) -> list[Message]:
        """One train instruction per partition in `cohort` (already sampled)."""
        self.spec.check_vector(vector)
        self.global_vector = np.asarray(vector, dtype=np.float32)
        wire = encode(self.global_vector)
        base = TrainInstruction(vector=self.global_vector, server_round=server_round, lr=lr,
                                spec_hash=self.spec.hash, clip_norm=self.clip_norm,
                                withhold_metrics=self.withhold_metrics)
        messages, sampled = [], []
        self._asked = {}
        for pid in cohort:
            node = self.roster[pid]
            settings = self.plugin_settings(server_round, pid)
            check_plugin_fields(settings)
            instruction = replace(base, dp_history=self.dp_history(pid),
                                  examples=self.examples.get(pid), **settings)
            messages.append(Message(content=instruction.to_record(wire),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
            sampled.append({"partition_id": pid, "node": node})
            self._asked[node] = pid
        self.outcome = RoundOutcome(sampled=sampled,
                                    bytes_down=sum(array_bytes(m.content) for m in messages))
        return messages

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Accepted]:
        """Check every reply; record failures, rejections, unsolicited and silent clients in
        `outcome`; return the accepted ones in partition order. Never raises on a reply."""
        if self.global_vector is None:
            raise RuntimeError("screen called before configure_train")
        accepted: list[Accepted] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self._asked or node in answered:
                self.outcome.unsolicited.append({
                    "node": node, "reason": "not asked to train this round, or replied twice"})
                continue
            answered.add(node)
            pid = self._asked[node]
            if msg.has_error():
                self.outcome.failed.append({"reason": _error_tail(msg.error.reason),
                                            "node": node, "partition_id": pid})
                continue
            size = array_bytes(msg.content)
            self.outcome.bytes_up += size
            owned = {"node": node, "partition_id": pid, "bytes_up": size}
            try:
                reply = TrainReply.from_record(msg.content, withheld=self.withhold_metrics)
            except ProtocolError as exc:
                self._reject(server_round, {}, owned, str(exc))
                continue
            reported = {**reply.report.ledger(),
                        "reported_dp": None if reply.dp is None else reply.dp.ledger()}
            mismatch = self._count_mismatch(pid, reply.report.num_examples)
            if mismatch is not None:
                self._reject(server_round, reported, owned, mismatch)
                continue
            try:
                delta = reply.decoded_delta(self.spec)
            except (ProtocolError, DeltaError) as exc:
                self._reject(server_round, reported, owned, str(exc))
                continue
            entry = {**reported, **owned,
                     "delta_norm": float(np.linalg.norm(delta.astype(np.float64))),
                     "weight": self._weight(server_round, pid)}
            accepted.append(Accepted(pid, node, delta, entry))
        for asked in self.outcome.sampled:
            if asked["node"] not in answered:
                self.outcome.failed.append({"reason": "no reply within train.round_timeout_s",
                                            **asked})
        # Replies arrive in completion order; sum in partition order so a re-run with the
        # same seed gives bit-identical global vectors.
        accepted.sort(key=lambda a: a.partition_id)
        self.outcome.accepted = [a.entry for a in accepted]
        return accepted

    def _count_mismatch(self, pid: int, reported: int | None) -> str | None:
        """Why a reply's example count is refused: the server fixed the partition's count
        (partition size, or the node's report at discovery) for the run."""
        known = self.examples.get(pid)
        if reported is None or known is None or reported == known:
            return None
        return (f"reports {reported} examples; the server holds {known} for partition {pid} "
                "for this run (a node's count is fixed at discovery)")

    def _examples(self, pid: int) -> int:
        """The examples `pid`'s weight counts: the server's count, at most `weight_cap`
        (1 each when it holds none: equal weights)."""
        n = self.examples.get(pid, 1)
        return n if self.weight_cap is None else min(n, self.weight_cap)

    def _weight(self, server_round: int, pid: int) -> float:
        weight = float(self.client_weight(server_round, pid))
        if not 0.0 <= weight <= 1.0:
            # A plugin's own bug, not a client's doing: a weight above 1 would raise a
            # client's DP sensitivity, a negative one flip its delta.
            raise ValueError(f"plugin weight {weight!r} for partition {pid} is not in [0, 1]")
        return weight

    def _reject(self, server_round: int, reported: dict[str, Any], owned: dict[str, Any],
                reason: str) -> None:
        # A reason may quote what the client sent (array metadata, key names): bounded.
        reason = bounded(reason)
        log(WARNING, "round %d: rejected the reply of partition %d (node %d): %s",
            server_round, owned["partition_id"], owned["node"], reason)
        self.outcome.rejected.append({**reported, **owned, "reason": reason})

    def reject(self, server_round: int, item: Accepted, reason: str) -> None:
        """Leave an accepted reply out of aggregation after all, keeping what it reported:
        a rejected client still spent privacy budget."""
        self.outcome.accepted = [c for c in self.outcome.accepted if c is not item.entry]
        entry = {k: v for k, v in item.entry.items() if k not in ("delta_norm", "weight")}
        log(WARNING, "round %d: rejected the delta of partition %d (node %d): %s",
            server_round, item.partition_id, item.node, reason)
        self.outcome.rejected.append({**entry, "reason": reason})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> np.ndarray | None:
        """The new global vector: the global plus the deltas combined by the configured
        rule (`strategies.robust`; by default their mean weighted by the server's example
        count x plugin weight); None when nothing moved it."""
        accepted = self.screen(server_round, replies)
        w = np.asarray([self._examples(a.partition_id) * a.entry["weight"] for a in accepted],
                       dtype=np.float64)
        if not accepted or not w.sum() > 0:  # nobody, or every client weighted 0
            return None
        result = robust.aggregate(np.stack([a.delta for a in accepted]), w, self.aggregation,
                                  [a.partition_id for a in accepted])
        self.outcome.aggregation = result.figures
        if result.delta is None:  # too few deltas for the rule's bound: keep the global
            self.outcome.update_refused = result.figures["refused"]
            log(WARNING, "round %d: %s; the global vector is kept", server_round,
                self.outcome.update_refused)
            return None
        with np.errstate(over="ignore"):
            new = (self.global_vector + result.delta).astype(np.float32)
        if not np.isfinite(new).all():
            # Finite float32 deltas near float32's limit can still average past it: keep
            # the global vector rather than end the run on an inf next round.
            self.outcome.update_refused = "the aggregated delta overflows float32"
            log(WARNING, "round %d: %s; the global vector is kept", server_round,
                self.outcome.update_refused)
            return None
        self.outcome.no_contribution = False
        return new


# A client's error text is bounded in the ledger; a traceback's last lines name the error.
MAX_REASON = 500


def _error_tail(reason: object) -> str:
    text = str(reason)
    if len(text) <= MAX_REASON:
        return text
    return f"... ({len(text):,} characters) {text[-MAX_REASON:]}"

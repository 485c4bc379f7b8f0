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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from logging import WARNING
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
from strategies import pipeline
from strategies.discovery import Roster
from strategies.pipeline import Accepted, ClientReport, Round, RoundOutcome, Screened, Sent

__all__ = ["Accepted", "DeltaFedAvg", "RoundHooks", "RoundOutcome", "Screened", "Sent"]


@dataclass(frozen=True)
class RoundHooks:
    """What the server (its plugins, its DP ledger) decides per client, given to the
    strategy once: the defaults are those of a run without plugins."""

    # The DP-SGD history the server holds for a partition, sent with its instruction.
    dp_history: Callable[[int], DPHistory | None] = lambda pid: None
    # Plugins' instruction fields for a partition, (round, pid) -> {field: settings}.
    plugin_settings: Callable[[int, int], dict[str, Any]] = lambda rnd, pid: {}
    # Plugins' say over the sampled partition ids (round, pids) -> pids.
    select_cohort: Callable[[int, list[int]], list[int]] = lambda rnd, pids: pids
    # Plugins' factor in [0, 1] on a client's delta, (round, pid) -> weight.
    client_weight: Callable[[int, int], float] = lambda rnd, pid: 1.0


class DeltaFedAvg:
    def __init__(self, spec: DeltaSpec, clients_per_round: int, seed: int,
                 hooks: RoundHooks | None = None,
                 aggregation: AggregationConfig | None = None,
                 withhold_metrics: bool = False,
                 report_groups: Iterable[str] = (),
                 reference: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """`aggregation`: the rule that combines the deltas (`[aggregation]`; the default
        is FedAvg). `withhold_metrics`: replies carry only what the server needs
        (`fedtune.wire.fields.withholds_counts`). `report_groups`: the optional figure
        groups (`fedtune.wire.protocol.EXTRA_GROUPS`) this run's clients report (split
        mode, a plugin's); a reply with any other group is rejected, so a client cannot
        add split or pruning figures to a run that has none. `reference`: the server's
        descent direction at a global vector (`fedtune.task.reference`), which
        `norm_bound_direction = "validation"` needs; computed once a round, at the global
        vector the round sent, before the deltas are combined."""
        if aggregation is not None and aggregation.norm_bound_direction == "validation" \
                and reference is None:
            raise ValueError("aggregation.norm_bound_direction='validation' needs the "
                             "server's reference direction (fedtune.task.reference)")
        self.reference = reference
        self.spec = spec
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.hooks = hooks or RoundHooks()
        self.aggregation = aggregation or AggregationConfig()
        self.withhold_metrics = withhold_metrics
        self.report_groups = frozenset(report_groups)
        # partition-id -> node id, bound at discovery. Flower draws node ids at random in
        # every run, so a cohort is drawn over partition ids and mapped through this roster.
        self.roster: dict[int, int] = {}
        # partition-id -> the examples the server weights it by and plans its DP charges
        # from (`adopt`). A roster set without counts (a strategy driven alone, in tests)
        # weights every client equally.
        self.examples: dict[int, int] = {}
        # The partitions whose count in `examples` a node reported (its own data file):
        # claims the privacy ledger checks whatever their value (`use_example_counts`).
        self.claimed: frozenset[int] = frozenset()
        # The most examples one client's weight counts (`adopt`: the largest corpus
        # partition). A node with its own file may report up to MAX_NODE_EXAMPLES; it is
        # charged by its true count, but weighted no heavier than the largest partition.
        self.weight_cap: int | None = None
        # Claims refused at discovery (a partition another node already holds).
        self.refused_claims: list[dict[str, Any]] = []

    # -- discovery and sampling

    def adopt(self, roster: Roster, sizes: Sequence[int] | None = None) -> dict[int, int]:
        """Take the roster discovery bound (`strategies.discovery`); its refused claims are
        kept in `refused_claims` for the round record. `sizes`: the corpus
        partitions' sizes (`task.partitions`), the example count of every partition whose
        node trains on it; a node with its own data file counts what it reported at
        discovery."""
        self.roster = dict(roster.nodes)
        self.refused_claims = list(roster.refused)
        if sizes is not None:
            self.examples = {pid: roster.own_examples.get(pid, int(sizes[pid]))
                             for pid in self.roster}
            self.claimed = frozenset(roster.own_examples) & frozenset(self.roster)
            self.weight_cap = max([1, *(int(n) for n in sizes)])
        return self.roster

    def refuse(self, refused: Mapping[int, str]) -> None:
        """Take the partitions in `refused` (partition id -> reason: a count the privacy
        ledger did not admit, `PrivacyLedger.use_example_counts`) out of the run: their
        nodes are never sampled, and the reason is kept with the discovery's refused claims
        for the round record (one line in run.log each)."""
        for pid, reason in sorted(refused.items()):
            node = self.roster.pop(pid, None)
            self.examples.pop(pid, None)
            if node is None:
                continue
            log(WARNING, "node %d %s; it takes no part in this run", node, reason)
            self.refused_claims.append({"node": node, "reason": reason})

    def partitions(self) -> list[int]:
        """The partition ids that have a node, sorted; raises when discovery bound none."""
        if not self.roster:
            raise RuntimeError("no partition has a node: discovery bound none (see the refused "
                               "claims), so no round can be sampled")
        return sorted(self.roster)

    def select(self, server_round: int, pids: list[int]) -> list[int]:
        """The plugins' say over a drawn cohort (`RoundHooks.select_cohort`)."""
        return self.hooks.select_cohort(server_round, pids)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """A seeded cohort of `clients_per_round` partition ids: the same seed gives the same
        partitions in every re-run. With fewer partitions bound at discovery (a node refused
        or silent), all of them."""
        pids = self.partitions()
        size = min(self.clients_per_round, len(pids))
        if size < self.clients_per_round:
            log(WARNING, "round %d: only %d partitions have a node; the cohort is %d, not "
                "train.clients_per_round=%d", server_round, size, size, self.clients_per_round)
        rng = random.Random(self.seed * 7919 + server_round)
        chosen = rng.sample(pids, size)
        return self.select(server_round, chosen)

    # -- train

    def configure_train(self, server_round: int, vector: np.ndarray, lr: float,
                        cohort: list[int], clip_norm: float | None = None,
                        withhold_metrics: bool = False) -> Sent:
        """One train instruction per partition in `cohort` (already sampled). `clip_norm`:
        client-side clipping's norm (user-level DP); `withhold_metrics`: ask the replies
        to withhold their figures (besides the strategy's own setting)."""
        self.spec.check_vector(vector)
        vector = np.asarray(vector, dtype=np.float32)
        withhold = self.withhold_metrics or withhold_metrics
        wire = encode(vector)
        base = TrainInstruction(vector=vector, server_round=server_round, lr=lr,
                                spec_hash=self.spec.hash, clip_norm=clip_norm,
                                withhold_metrics=withhold)
        messages, sampled, asked = [], [], {}
        for pid in cohort:
            node = self.roster[pid]
            settings = self.hooks.plugin_settings(server_round, pid)
            check_plugin_fields(settings)
            instruction = replace(base, dp_history=self.hooks.dp_history(pid),
                                  examples=self.examples.get(pid), **settings)
            messages.append(Message(content=instruction.to_record(wire),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
            sampled.append({"partition_id": pid, "node": node})
            asked[node] = pid
        return Sent(server_round, vector, messages, sampled, asked, withhold,
                    sum(array_bytes(m.content) for m in messages))

    def screen(self, sent: Sent, replies: Iterable[Message]) -> Screened:
        """Check every reply to `sent`: the failures, rejections, unsolicited and silent
        clients with their reasons, and the accepted ones in partition order. Never raises
        on a reply."""
        server_round = sent.server_round
        accepted: list[Accepted] = []
        rejected: list[dict[str, Any]] = []
        rejected_reports: list[ClientReport] = []
        failed: list[dict[str, Any]] = []
        unsolicited: list[dict[str, Any]] = []
        bytes_up = 0
        answered: set[int] = set()
        # (message id, node) of each instruction this round sent: a reply counts only as
        # the answer to one of them, from the node it went to, so a late reply to an earlier
        # round or a forged reply_to never reaches the aggregate (the Grid's pull filters
        # too, but the trust boundary is here).
        instructions = sent.instruction_ids()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in sent.asked or node in answered:
                unsolicited.append({
                    "node": node, "reason": "not asked to train this round, or replied twice"})
                continue
            if (msg.metadata.reply_to_message_id, node) not in instructions:
                unsolicited.append({
                    "node": node, "reason": "answers no instruction this round sent to it "
                                            "(a reply to an earlier round, or a forged "
                                            "reply_to)"})
                continue
            answered.add(node)
            pid = sent.asked[node]
            if msg.has_error():
                failed.append({"reason": _error_tail(msg.error.reason),
                               "node": node, "partition_id": pid})
                continue
            size = array_bytes(msg.content)
            bytes_up += size
            owned = {"node": node, "partition_id": pid, "bytes_up": size}
            try:
                reply = TrainReply.from_record(msg.content, withheld=sent.withhold_metrics)
            except ProtocolError as exc:
                rejected.append(_rejected(server_round, {}, owned, str(exc)))
                continue
            reported = {**reply.report.ledger(),
                        "reported_dp": None if reply.dp is None else reply.dp.ledger()}
            unexpected = sorted(reply.report.groups() - self.report_groups)
            if unexpected:
                rejected.append(_rejected(
                    server_round, reported, owned,
                    f"reports {', '.join(unexpected)} figures, which this run does not use "
                    f"(it expects {sorted(self.report_groups) or 'none'})"))
                continue
            mismatch = self._count_mismatch(pid, reply.report.num_examples)
            if mismatch is not None:
                rejected.append(_rejected(server_round, reported, owned, mismatch))
                rejected_reports.append(ClientReport(pid, reply.report))
                continue
            try:
                delta = reply.decoded_delta(self.spec)
            except (ProtocolError, DeltaError) as exc:
                rejected.append(_rejected(server_round, reported, owned, str(exc)))
                rejected_reports.append(ClientReport(pid, reply.report))
                continue
            entry = {**reported, **owned,
                     "delta_norm": float(np.linalg.norm(delta.astype(np.float64))),
                     "weight": self._weight(server_round, pid)}
            accepted.append(Accepted(pid, node, delta, entry, reply.report))
        for asked in sent.sampled:
            if asked["node"] not in answered:
                failed.append({"reason": "no reply within train.round_timeout_s", **asked})
        # Replies arrive in completion order; sum in partition order so a re-run with the
        # same seed gives bit-identical global vectors.
        accepted.sort(key=lambda a: a.partition_id)
        return Screened(accepted, rejected, failed, unsolicited, bytes_up, rejected_reports)

    def _count_mismatch(self, pid: int, reported: int | None) -> str | None:
        """Why a reply's example count is refused: the server fixed the partition's count
        (partition size, or the node's report at discovery) for the run."""
        known = self.examples.get(pid)
        if reported is None or known is None or reported == known:
            return None
        return (f"reports {reported} examples; the server holds {known} for partition {pid} "
                "for this run (a node's count is fixed at discovery)")

    def _weight(self, server_round: int, pid: int) -> float:
        weight = float(self.hooks.client_weight(server_round, pid))
        if not 0.0 <= weight <= 1.0:
            # A plugin's own bug, not a client's doing: a weight above 1 would raise a
            # client's DP sensitivity, a negative one flip its delta.
            raise ValueError(f"plugin weight {weight!r} for partition {pid} is not in [0, 1]")
        return weight

    def aggregate_train(self, sent: Sent, replies: Iterable[Message]) -> Round:
        """The round's result: the new global vector (the global plus the deltas combined by
        the configured rule, `strategies.robust`; by default their mean weighted by the
        server's example count x plugin weight; None when nothing moved it) and its
        outcome."""
        screened = self.screen(sent, replies)
        weights = pipeline.server_weights(screened.accepted, self.examples, self.weight_cap)
        reference = None
        if (self.aggregation.norm_bound_direction == "validation" and self.reference
                is not None and screened.accepted and weights.sum() > 0):
            reference = self.reference(sent.vector)
        combined = pipeline.combine(screened.accepted, weights, self.aggregation, reference,
                                    self.clients_per_round)
        if combined is None:
            return Round(None, RoundOutcome.of(sent, screened))
        if combined.delta is None:  # too few deltas for the rule's bound: keep the global
            refused = combined.figures["refused"]
        else:
            new, refused = pipeline.apply(sent.vector, combined.delta)
            if new is not None:
                return Round(new, RoundOutcome.of(sent, screened, no_contribution=False,
                                                  aggregation=combined.figures))
        log(WARNING, "round %d: %s; the global vector is kept", sent.server_round, refused)
        return Round(None, RoundOutcome.of(sent, screened, update_refused=refused,
                                           aggregation=combined.figures))


def _rejected(server_round: int, reported: dict[str, Any], owned: dict[str, Any],
              reason: str) -> dict[str, Any]:
    """A rejected reply's ledger entry: what it reported first, the server's fields last."""
    # A reason may quote what the client sent (array metadata, key names): bounded.
    reason = bounded(reason)
    log(WARNING, "round %d: rejected the reply of partition %d (node %d): %s",
        server_round, owned["partition_id"], owned["node"], reason)
    return {**reported, **owned, "reason": reason}


# A client's error text is bounded in the ledger: its head (where Flower puts the
# exception's class) and its tail (a traceback's last lines name the error).
MAX_REASON = 500
_HEAD = 150


def _error_tail(reason: object) -> str:
    text = str(reason)
    if len(text) <= MAX_REASON:
        return text
    tail = MAX_REASON - _HEAD
    return f"{text[:_HEAD]} ... ({len(text):,} characters) ... {text[-tail:]}"

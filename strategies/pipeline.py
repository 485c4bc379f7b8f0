"""The server's delta pipeline: one round flows one way, each step a value in and a value
out, its ledger figures returned with it (as pfl-research's postprocessors and Flower's DP
wrappers compose), never written into another object.

    configure ─> Sent ──(grid)──> replies
    screen(Sent, replies)        -> Screened    accepted (typed, decoded), rejected, failed,
                                                unsolicited (a reply to no message of
                                                this round), bytes up: the trust boundary
    FedAvg (`DeltaFedAvg`):
      server_weights(accepted)   -> w           examples the server holds x plugin weight
      combine(accepted, w, rule, reference, cohort) -> Aggregated  norm bound + rule
      apply(global, delta)       -> vector | refusal (float32 overflow keeps the global)
    user-level DP (`UserLevelDP`, composing the same screen):
      clip(accepted, C, mode)    -> Clipped     float64 deltas of norm <= C; refusals
                                                (client-side clipping: a delta over C)
      weight(clipped)            -> contributions (a plugin weight in [0, 1] only shrinks)
      total(contributions)       -> sum         in partition order
      release(global, sum, cohort, noise) -> vector   global + sum / cohort + noise
    RoundOutcome                 built once from the steps' figures: what the round record
                                 says of the clients, bytes, rule and norms.

A strategy holds what it owns for the run (roster, example counts, hooks given at
construction); a round's state travels in the values (`Sent`, `Screened`), so a wrapper
calls the inner strategy's public methods and never reads or writes its attributes.

Every float operation and its order are those of the code this replaced (the golden runs
check the figures bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import log

from fedtune.config import AggregationConfig
from fedtune.wire.protocol import TrainReport
from strategies import robust

# Client-side clipping is checked to this relative tolerance (float32 rounding of the norm).
CLIP_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Sent:
    """A round's instructions as sent: what screening its replies needs."""

    server_round: int
    vector: np.ndarray  # the global vector sent (float32)
    messages: list[Message]
    # The partitions asked with their nodes, in the cohort's order (the server's roster).
    sampled: list[dict[str, Any]]
    asked: Mapping[int, int]  # node id -> partition id
    withhold_metrics: bool  # replies must leave out the withholdable figures
    bytes_down: int

    def instruction_ids(self) -> set[tuple[str, int]]:
        """(message id, destination node) of each instruction, read when the replies are
        screened: the Grid gives a message its id as it pushes it (Flower's InMemoryGrid and
        HttpGrid set `metadata.message_id` to the id `push_messages` returns), so this is
        read after the push, never when the round is configured."""
        return {(m.metadata.message_id, m.metadata.dst_node_id) for m in self.messages}

    @property
    def partition_ids(self) -> list[int]:
        """The partitions asked, in the order the instructions were built (the cohort's)."""
        return [s["partition_id"] for s in self.sampled]


@dataclass(frozen=True)
class ClientReport:
    """What a client reported about its round (typed, checked at the boundary), with the
    partition the server asked it for. The ledger's sums (`round_extras`, split mode's
    fields, the training loss) read these, never the ledger entries' keys."""

    partition_id: int
    report: TrainReport


@dataclass(frozen=True)
class Accepted:
    """A reply that passed every check: its partition, node and decoded delta, its ledger
    entry (the reported figures first, the server-owned ones last) and its typed report."""

    partition_id: int
    node: int
    delta: np.ndarray
    entry: dict[str, Any]
    report: TrainReport

    @property
    def reported(self) -> ClientReport:
        return ClientReport(self.partition_id, self.report)

    @property
    def weight(self) -> float:
        """The plugins' weight in [0, 1] (server-owned, set at screening)."""
        return self.entry["weight"]


@dataclass(frozen=True)
class Screened:
    """Every reply of a round sorted at the boundary. `accepted` in partition order."""

    accepted: list[Accepted]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    # Replies from nodes that were not asked to train this round, that replied twice, or
    # that answer no message this round sent them (an earlier round's, a forged reply_to).
    unsolicited: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    # The typed reports of the rejected replies that parsed, in `rejected`'s order: a
    # rejected client's traffic and work still count in the round's totals.
    rejected_reports: list[ClientReport] = field(default_factory=list)

    def refuse(self, server_round: int, refused: Sequence[tuple[Accepted, str]]
               ) -> Screened:
        """These accepted replies left out after all (a later step's check), as rejected
        entries that keep what they reported: a rejected client still spent budget."""
        if not refused:
            return self
        out = {id(item) for item, _ in refused}
        rejected = list(self.rejected)
        reports = list(self.rejected_reports)
        for item, reason in refused:
            log(WARNING, "round %d: rejected the delta of partition %d (node %d): %s",
                server_round, item.partition_id, item.node, reason)
            entry = {k: v for k, v in item.entry.items() if k not in ("delta_norm", "weight")}
            rejected.append({**entry, "reason": reason})
            reports.append(item.reported)
        return replace(self, accepted=[a for a in self.accepted if id(a) not in out],
                       rejected=rejected, rejected_reports=reports)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round's aggregation saw, for the ledger. Every entry of `sampled`,
    `accepted`, `rejected` and `failed` carries the server's `partition_id` and `node`."""

    sampled: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
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
    # The typed reports: of `accepted` (same order), and of the rejected replies that
    # parsed (`Screened.rejected_reports`).
    accepted_reports: list[ClientReport] = field(default_factory=list)
    rejected_reports: list[ClientReport] = field(default_factory=list)

    @classmethod
    def of(cls, sent: Sent, screened: Screened, **figures: Any) -> RoundOutcome:
        """The outcome of a round from its two values and the later steps' figures."""
        return cls(sampled=sent.sampled, accepted=[a.entry for a in screened.accepted],
                   rejected=screened.rejected, failed=screened.failed,
                   unsolicited=screened.unsolicited, bytes_down=sent.bytes_down,
                   bytes_up=screened.bytes_up,
                   accepted_reports=[a.reported for a in screened.accepted],
                   rejected_reports=screened.rejected_reports, **figures)


@dataclass(frozen=True)
class Round:
    """A round's result: the new global vector (None: keep the old one) and its outcome."""

    vector: np.ndarray | None
    outcome: RoundOutcome


# -- FedAvg steps


def server_weights(accepted: Sequence[Accepted], examples: Mapping[int, int],
                   weight_cap: int | None) -> np.ndarray:
    """Each delta's weight: the examples the server holds for its partition (1 each when it
    holds none: equal weights), at most `weight_cap`, times its plugin weight."""
    def counted(pid: int) -> int:
        n = examples.get(pid, 1)
        return n if weight_cap is None else min(n, weight_cap)
    return np.asarray([counted(a.partition_id) * a.weight for a in accepted],
                      dtype=np.float64)


def combine(accepted: Sequence[Accepted], weights: np.ndarray, rule: AggregationConfig,
            reference: np.ndarray | None, cohort: int) -> robust.Aggregated | None:
    """The configured rule over the deltas (`strategies.robust`); None when no delta has a
    positive weight (nobody, or every client weighted 0). `reference`: the server's
    validation direction (`norm_bound_direction = "validation"`); `cohort`: the configured
    cohort size (`train.clients_per_round`)."""
    if not accepted or not weights.sum() > 0:
        return None
    return robust.aggregate(np.stack([a.delta for a in accepted]), weights, rule,
                            [a.partition_id for a in accepted], reference, cohort)


def apply(vector: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(global + delta as float32, None), or (None, why) when it overflows float32: finite
    float32 deltas near float32's limit can still average past it, and an inf would end
    the run next round."""
    with np.errstate(over="ignore"):
        new = (vector + delta).astype(np.float32)
    if not np.isfinite(new).all():
        return None, "the aggregated delta overflows float32"
    return new, None


# -- user-level DP steps


def clip_exact(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    """`delta` in float64, scaled down to norm at most `clip_norm`."""
    out = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(out))
    if norm > clip_norm:
        out = out * (clip_norm / norm)
        # One more shrink if rounding left it a hair over.
        over = float(np.linalg.norm(out))
        if over > clip_norm:
            out = out * np.nextafter(clip_norm / over, 0.0)
    return out


@dataclass(frozen=True)
class Clipped:
    """Deltas clipped to the bound (`kept`, float64, paired with their replies) and the
    replies refused (client-side clipping: a delta over the bound it was told)."""

    kept: list[tuple[Accepted, np.ndarray]]
    refused: list[tuple[Accepted, str]]


def clip(accepted: Sequence[Accepted], clip_norm: float, client_side: bool) -> Clipped:
    """Every delta clipped to `clip_norm` (server side; with client-side clipping a delta
    over it is refused and the rest clipped again, so float rounding cannot lift the bound)."""
    kept, refused = [], []
    for item in accepted:
        norm = float(np.linalg.norm(item.delta.astype(np.float64)))
        if client_side and norm > clip_norm * (1 + CLIP_TOLERANCE):
            refused.append((item, f"delta norm {norm:.6g} exceeds privacy.user.clip_norm="
                                  f"{clip_norm} (client-side clipping)"))
            continue
        kept.append((item, clip_exact(item.delta, clip_norm)))
    return Clipped(kept, refused)


def weight(clipped: Clipped) -> list[np.ndarray]:
    """Each clipped delta times its plugin weight: clip first, then weight, so a weight
    <= 1 can only shrink what one client adds."""
    return [delta * item.weight for item, delta in clipped.kept]


def total(contributions: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, list[float]]:
    """The sum of the contributions (float64, `size` values, in order) and their norms."""
    out = np.zeros(size, dtype=np.float64)
    norms = []
    for contribution in contributions:
        norms.append(float(np.linalg.norm(contribution)))
        out += contribution
    return out, norms


def release(base: np.ndarray, summed: np.ndarray, cohort: int, noise: np.ndarray
            ) -> np.ndarray:
    """The released global vector: global + sum / expected cohort + noise, as float32."""
    return (base + summed / cohort + noise).astype(np.float32)

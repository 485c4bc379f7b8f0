"""The two records a run writes, typed: one `RoundRecord` per round (a line of
rounds.jsonl, before `fedtune.run.curator_log.split_record` moves the cohort's figures to the
curator's log) and the run's `Summary` (summary.json). Each is built once, from the values
the round loop holds, and written once through `to_json()`, which gives the run-folder
contract's keys in their documented order (DESIGN.md, "Run folder contract").

What the typed fields hold is the contract's core; what varies with the run's method,
plugins, split mode and privacy levels rides in the named groups (`privacy`, `notes`,
`extras`, ...), each a mapping of ledger keys the producing module documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """One round as the server saw it (a rounds.jsonl line)."""

    round: int
    # Validation figures of the new global vector (None without a validation split).
    val_accuracy: float | None
    val_loss: float | None
    epsilon_sample: float | None
    epsilon_user: float | None
    delta: float | None
    clients: int  # deltas accepted
    bytes_up: int
    bytes_down: int
    client_flops: float
    wall_s: float | None
    lr: float
    train_loss: float | None  # mean reported loss over the accepted clients' examples
    sampled: int
    no_contribution: bool
    rejected: Sequence[Mapping[str, Any]]
    failed: Sequence[Mapping[str, Any]]
    per_client: Sequence[Mapping[str, Any]]  # the accepted clients' ledger entries
    forward_layers_skipped: Any
    # `noise`, `privacy_sample`, `privacy_user` (`strategies.privacy_ledger`).
    privacy: Mapping[str, Any]
    privacy_in_clear: Any  # `fedtune.wire.in_clear`
    # `epsilon_sample_note`, `epsilon_user_note` (`fedtune.run.epsilon_marks`).
    notes: Mapping[str, Any]
    # Present only when the round has them.
    unsolicited: Sequence[Mapping[str, Any]] = ()
    aggregation: Mapping[str, Any] | None = None
    update_refused: str | None = None
    refused_claims: Sequence[Mapping[str, Any]] = ()
    # Plugins' round extras, then split mode's fields (`fedtune.split.ledger_fields`).
    extras: Mapping[str, Any] = field(default_factory=dict)
    # The majority class's validation accuracy (`fedtune.task.evaluation.majority_fields`):
    # the same every round, beside `val_accuracy` so one line tells learning from guessing.
    majority_val_accuracy: float | None = None
    # A causal-LM task's validation perplexity (token-weighted); None for a classifier.
    val_perplexity: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "epsilon_sample": self.epsilon_sample,
            "epsilon_user": self.epsilon_user,
            "delta": self.delta,
            "clients": self.clients,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "client_flops": self.client_flops,
            "wall_s": self.wall_s,
            "lr": self.lr,
            "train_loss": self.train_loss,
            "majority_val_accuracy": self.majority_val_accuracy,
            "val_perplexity": self.val_perplexity,
            "sampled": self.sampled,
            "no_contribution": self.no_contribution,
            "rejected": list(self.rejected),
            "failed": list(self.failed),
            "per_client": list(self.per_client),
            "forward_layers_skipped": self.forward_layers_skipped,
            **self.privacy,
        }
        if self.unsolicited:
            out["unsolicited"] = list(self.unsolicited)
        if self.aggregation is not None:
            out["aggregation"] = self.aggregation
        if self.update_refused is not None:
            out["update_refused"] = self.update_refused
        if self.refused_claims:
            out["refused_claims"] = list(self.refused_claims)
        out["privacy_in_clear"] = self.privacy_in_clear
        out.update(self.notes)
        out.update(self.extras)
        return out


@dataclass(frozen=True)
class Summary:
    """The run's summary (summary.json): the final model on the test split, the best
    validation round, both epsilons and the run's totals."""

    # final/initial/best accuracy fields (`fedtune.task.evaluation.accuracy_fields`) and
    # the perplexity fields (`fedtune.task.kinds.SUMMARY_PERPLEXITY`), each null where the
    # task kind does not compute it.
    accuracy: Mapping[str, Any]
    initial_evaluated: str
    epsilon_sample: float | None
    epsilon_user: float | None
    delta: float | None
    notes: Mapping[str, Any]  # the epsilon notes of the last round's figures
    noise: Any
    privacy_sample: Mapping[str, Any] | None
    privacy_user: Mapping[str, Any] | None
    rounds: int
    stopped_early: Mapping[str, Any] | None
    # Null under user-level DP without log_cohorts (cohort sums: the curator's log).
    total_bytes_up: int | None
    total_bytes_down: int | None
    total_client_flops: float | None
    trainable_params: int
    backbone_params: int
    method: str
    resumed_at_rounds: Sequence[int]
    wall_s: float | None
    # Who the accuracy is about (two domains), split mode's totals, the pruned backbone.
    population: Mapping[str, Any] = field(default_factory=dict)
    split: Mapping[str, Any] = field(default_factory=dict)
    pruning: Mapping[str, Any] = field(default_factory=dict)
    # `majority_label`, `majority_accuracy` (test), `majority_val_accuracy`
    # (`fedtune.task.evaluation.majority_fields`): the baseline a run must beat.
    baseline: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.accuracy,
            **self.baseline,
            "initial_evaluated": self.initial_evaluated,
            "epsilon_sample": self.epsilon_sample,
            "epsilon_user": self.epsilon_user,
            "delta": self.delta,
            **self.notes,
            "noise": self.noise,
            "privacy_sample": self.privacy_sample,
            "privacy_user": self.privacy_user,
            "rounds": self.rounds,
            "stopped_early": self.stopped_early,
            "total_bytes_up": self.total_bytes_up,
            "total_bytes_down": self.total_bytes_down,
            "total_client_flops": self.total_client_flops,
            "trainable_params": self.trainable_params,
            "backbone_params": self.backbone_params,
            "method": self.method,
            "resumed_at_rounds": self.resumed_at_rounds,
            "wall_s": self.wall_s,
            **self.population,
            **self.split,
            **self.pruning,
        }

"""One round of the server's loop: send the global vector to the cohort, charge its planned
spend, screen and aggregate the replies, evaluate on the validation split and build the
round's record. The round gets the values it needs (`RoundSettings`, made once per run by
`strategies.server.run_server` from the experiment config), never the config itself.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedtune.run.checkpoint import ServerState
from fedtune.run.records import RoundRecord
from fedtune.split.ledger_fields import split_round_fields
from strategies.delta_fedavg import DeltaFedAvg
from strategies.grid_io import send_and_receive
from strategies.pipeline import ClientReport
from strategies.plugins import Plugin
from strategies.privacy_ledger import PrivacyLedger
from strategies.user_dp import UserLevelDP


@dataclass(frozen=True)
class RoundSettings:
    """What every round of a run needs from it, fixed when the run starts."""

    lr: float  # train.lr, the first round's
    lr_decay: float  # train.lr_decay, per round
    timeout_s: float  # train.round_timeout_s: how long the round waits for replies
    poll_s: float  # seconds between pulls of the grid
    # The validation figures (`val_accuracy`, `val_loss`, `val_perplexity`) of a global
    # vector.
    evaluate: Callable[[np.ndarray], Mapping[str, float | None]]
    # The notes beside a record's epsilons (`fedtune.run.epsilon_marks.note_fields`).
    notes: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    forward_layers_skipped: int  # the server's own, from the config and the model
    privacy_in_clear: Mapping[str, Any]  # `fedtune.wire.in_clear`
    split_statement: Mapping[str, Any]  # what each split round states (empty: not split)
    # The majority class's validation accuracy, written beside each round's (a constant).
    majority_val_accuracy: float | None = None

    def lr_at(self, rnd: int) -> float:
        return self.lr * self.lr_decay ** (rnd - 1)


def play_round(rnd: int, cohort: list[int], grid: Grid, driver: DeltaFedAvg | UserLevelDP,
               privacy: PrivacyLedger, plugins: Sequence[Plugin], state: ServerState,
               settings: RoundSettings, refused_claims: Sequence[Mapping[str, Any]]
               ) -> RoundRecord:
    """One round: send the global vector to `cohort`, aggregate the replies, evaluate;
    updates `state.vector` and returns the round's record."""
    t_round = time.perf_counter()
    lr = settings.lr_at(rnd)
    sent = driver.configure_train(rnd, state.vector, lr, cohort)
    # After the messages are built (they carry each client's history before this round's
    # charge) and before they go out: a client that never replies is charged all the same.
    privacy.charge_sent(rnd, sent.partition_ids)
    replies = send_and_receive(grid, sent.messages, settings.timeout_s, pause=settings.poll_s)
    result = driver.aggregate_train(sent, replies)
    if result.vector is not None:
        state.vector = result.vector
    outcome = result.outcome
    privacy.settle(rnd)
    metrics = settings.evaluate(state.vector)  # validation, never test
    accepted = outcome.accepted
    fields = privacy.fields()
    if fields["privacy_user"] is not None:
        fields["privacy_user"] = {**fields["privacy_user"],
                                  "aggregated_delta_norms": outcome.aggregated_norms}
    epsilons = {"epsilon_sample": fields.pop("epsilon_sample"),
                "epsilon_user": fields.pop("epsilon_user")}
    reports = outcome.accepted_reports
    extras: dict[str, Any] = {}
    for plugin in plugins:
        extras.update(plugin.round_extras(rnd, reports))
    trained = [c.report for c in reports + outcome.rejected_reports]
    extras.update(split_round_fields(trained, outcome.bytes_up, outcome.bytes_down,
                                     dict(settings.split_statement)))
    return RoundRecord(
        round=rnd,
        val_accuracy=metrics["val_accuracy"],
        val_loss=metrics["val_loss"],
        val_perplexity=metrics.get("val_perplexity"),
        **epsilons,
        delta=fields.pop("delta"),
        clients=len(accepted),
        bytes_up=outcome.bytes_up,
        bytes_down=outcome.bytes_down,
        client_flops=sum(c.report.flops or 0.0 for c in reports),
        wall_s=time.perf_counter() - t_round,
        lr=lr,
        train_loss=train_loss(reports),
        sampled=len(outcome.sampled),
        no_contribution=outcome.no_contribution,
        rejected=outcome.rejected,
        failed=outcome.failed,
        per_client=accepted,
        forward_layers_skipped=settings.forward_layers_skipped,
        privacy=fields,
        privacy_in_clear=copy.deepcopy(dict(settings.privacy_in_clear)),
        notes=settings.notes(epsilons),  # beside each epsilon: what weakens it
        unsolicited=outcome.unsolicited,
        aggregation=outcome.aggregation,
        update_refused=outcome.update_refused,
        refused_claims=refused_claims,
        extras=extras,
        majority_val_accuracy=settings.majority_val_accuracy,
    )


def train_loss(reports: Sequence[ClientReport]) -> float | None:
    """Mean reported training loss over the accepted clients' examples; None when no
    client reported one (none accepted, or losses withheld)."""
    reported = [c.report for c in reports
                if c.report.loss is not None and c.report.num_examples is not None]
    examples = sum(r.num_examples or 0 for r in reported)
    if not examples:
        return None
    return sum((r.loss or 0.0) * (r.num_examples or 0) for r in reported) / examples

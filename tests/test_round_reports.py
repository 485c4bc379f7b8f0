"""Reported figures through a whole round (`strategies.round.play_round`): what one client
says about its work can neither break the round record (inf, negative, fields of a mode the
run does not use) nor set a figure for everyone (the reproducers of review ATTACK27C).

Each test drives one real round (DeltaFedAvg screening, aggregation, PrivacyLedger, the
record) on an in-process grid: two honest clients and one hostile client whose reply stays
inside the protocol's per-field bounds, with the right example count and an honest delta.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from wire import honest_metrics, raw_reply, spec_of

from fedtune.config import load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.delta_fedavg import DeltaFedAvg
from strategies.discovery import Roster
from strategies.privacy_ledger import PrivacyLedger
from strategies.round import RoundSettings, play_round

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = spec_of(6)
COHORT = 3
SIZE = 10  # examples per partition: every reply reports exactly this (accepted)
HOSTILE = 0  # the lowest partition id: its report comes first in the round's sums


def split_metrics(full: float = 1e6, **over: float) -> dict:
    """Split mode's figure group, on the wire, as an honest split client reports it."""
    out = {"smashed-bytes-up": 100, "smashed-bytes-down": 100, "server-flops": 1e6,
           "split-steps": 2, "local-loss-steps": 0, "split-examples": 20,
           "local-loss-examples": 0, "client-flops-per-example": 1e3,
           "full-model-flops-per-example": full, "probe-bytes": 0}
    out.update(over)
    return out


class Grid:
    """Answers every pushed instruction at once with `answer(pid, msg)`."""

    def __init__(self, answer):
        self.answer, self.pending = answer, []

    def get_node_ids(self):
        return [100 + p for p in range(COHORT)]

    def push_messages(self, messages):
        self.pending = list(messages)
        return ["" for _ in self.pending]

    def pull_messages(self, ids):
        out = [self.answer(m.metadata.dst_node_id - 100, m) for m in self.pending]
        self.pending = []
        return out


def play(metrics_of, split_run: bool, groups: tuple[str, ...] = (), accepted: int = COHORT
         ) -> dict:
    """One real round; `metrics_of(pid)` gives each client's reply metrics (wire keys) and
    `groups` the figure groups the run's clients report (split mode adds "split"). Returns
    the round record as rounds.jsonl would hold it."""
    cfg = load_config(None, [f"data.num_clients={COHORT}", f"train.clients_per_round={COHORT}"])
    groups = (*groups, "split") if split_run else groups
    strategy = DeltaFedAvg(SPEC, COHORT, seed=0, report_groups=groups)
    strategy.adopt(Roster(nodes={p: 100 + p for p in range(COHORT)}), [SIZE] * COHORT)
    state = ServerState(0, np.zeros(6, np.float32), SPEC.hash, {})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [SIZE] * COHORT, state)
    settings = RoundSettings(
        lr=0.1, lr_decay=1.0, timeout_s=1.0, poll_s=0.0,
        evaluate=lambda v: {"val_accuracy": None, "val_loss": None},
        notes=lambda r: {}, forward_layers_skipped=0, privacy_in_clear={},
        split_statement={"smashed_data": "in clear"} if split_run else {})

    def answer(pid, msg):
        return raw_reply(msg, np.full(6, 0.1), SPEC.hash, metrics_of(pid))

    record = play_round(1, list(range(COHORT)), Grid(answer), strategy, ledger, [], state,
                        settings, []).to_json()
    assert record["clients"] == accepted, record["rejected"]
    return record


def numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v)
    elif isinstance(tree, float):
        yield tree


def test_an_in_bounds_report_cannot_put_infinity_into_the_round_record():
    """Every figure of a round record stays finite (strict JSON): a full model of 1e-300
    FLOPs per example is refused at the boundary (at least 1), and 1e30 FLOPs over 0
    examples stays finite."""
    def metrics(pid):
        if pid == HOSTILE:
            return {**honest_metrics(SIZE), "flops": 1e30, "examples-seen": 0,
                    **split_metrics(full=1e-300)}
        return {**honest_metrics(SIZE), **split_metrics()}

    record = play(metrics, split_run=True, accepted=COHORT - 1)
    assert "full-model-flops-per-example" in record["rejected"][0]["reason"]
    bad = [x for x in numbers(record) if not math.isfinite(x)]
    assert not bad, (bad, record.get("client_flops_fraction"))
    json.loads(json.dumps(record), parse_constant=lambda c: pytest.fail(f"{c} in record"))

    def huge(pid):  # accepted: a finite, in-bounds figure stays finite in the sums
        extra = {"flops": 1e30, "examples-seen": 0} if pid == HOSTILE else {}
        return {**honest_metrics(SIZE), **split_metrics(full=1.0), **extra}

    record = play(huge, split_run=True)
    assert all(math.isfinite(x) for x in numbers(record))


def test_a_non_split_run_gets_no_split_fields_from_a_reply():
    """A non-split run's round record gets no split fields whatever a client reports: a
    reply with a figure group the run does not use is rejected with its reason."""
    def metrics(pid):
        extra = split_metrics(**{"smashed-bytes-up": 10**12}) if pid == HOSTILE else {}
        return {**honest_metrics(SIZE), **extra}

    record = play(metrics, split_run=False, accepted=COHORT - 1)
    injected = sorted(k for k in ("smashed_bytes_up", "total_bytes", "server_flops",
                                  "client_flops_fraction") if k in record)
    assert not injected, {k: record[k] for k in injected}
    (rejected,) = record["rejected"]
    assert rejected["partition_id"] == HOSTILE
    assert "reports split figures, which this run does not use" in rejected["reason"]


def test_one_client_does_not_set_the_rounds_full_model_flops():
    """The round's full_model_flops_per_example (a property of the model, the denominator of
    client_flops_fraction) is the split clients' median, not one client's word."""
    def metrics(pid):
        full = 1.0 if pid == HOSTILE else 1e6
        return {**honest_metrics(SIZE), **split_metrics(full=full)}

    record = play(metrics, split_run=True)
    assert record["full_model_flops_per_example"] == 1e6


def test_client_flops_fraction_is_never_negative():
    """A reply's pruning scoring_flops above its FLOPs is refused at the boundary (scoring
    is part of the round's FLOPs), so client_flops_per_example stays >= 0; and a pruning
    group in a run without pruning is refused as any unused group is."""
    pruning = {"examples-available": SIZE, "examples-kept": SIZE, "rescored": 1,
               "scoring-flops": 1e30, "flops-saved": 0.0}

    def metrics(pid):
        extra = pruning if pid == HOSTILE else {}
        return {**honest_metrics(SIZE), **split_metrics(), **extra}

    record = play(metrics, split_run=True, groups=("pruning", "pruning_split"),
                  accepted=COHORT - 1)
    assert "scoring-flops" in record["rejected"][0]["reason"]
    assert record["client_flops_per_example"] >= 0 and record["client_flops_fraction"] >= 0
    pruning["scoring-flops"] = 1.0  # consistent, but no pruning in this run

    record = play(metrics, split_run=True, accepted=COHORT - 1)
    assert "reports pruning figures, which this run does not use" in (
        record["rejected"][0]["reason"])

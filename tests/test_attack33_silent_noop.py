"""ATTACK33: a round where a majority of rows is zeroed makes no update (the median of a
majority of zeros is 0 on every coordinate) but its outcome says a client contributed
(`no_contribution` false, no `update_refused`), while a round where every row is zeroed is
refused with EVERY_ROW_ZEROED. `RoundOutcome.no_contribution` is "True when no client's
delta moved the aggregate this round"; a run whose every round is majority-zeroed ends
without NoContributionError, with the initial model."""

import numpy as np
import pytest
from conftest import FakeGrid
from test_robust_weighting import SPEC
from wire import reply

from fedtune.config import AggregationConfig
from strategies import DeltaFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")


def _round(deltas, reference_vector):
    cfg = AggregationConfig(rule="median", norm_bound="adaptive", tolerate=2,
                            norm_bound_direction="validation", direction_weighting="zero")
    cfg.validate()
    strategy = DeltaFedAvg(SPEC, 5, seed=0, aggregation=cfg,
                           reference=lambda vector: reference_vector)
    strategy.roster = {i: 11 + i for i in range(5)}
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    start = np.arange(6, dtype=np.float32)
    sent = strategy.configure_train(1, start, 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    return start, strategy.aggregate_train(
        sent, [reply(by_pid[pid], deltas[pid], SPEC, n=10) for pid in sorted(by_pid)])


def test_a_majority_zeroed_round_makes_no_update_and_says_why():
    """Adversary: tolerate = 2 clients of 5 that send the honest step reversed (both
    zeroed); with one honest non-IID client zeroed beside them the round is a no-op.
    Breaks the round record's contract (THREATS.md class 4: a round that makes no update
    says why, never silently) and the documented claim that only a round where every row
    is zeroed makes no update."""
    deltas = np.ones((5, 6))
    deltas[:3] = -1.0  # partitions 0, 1: attackers; 2: an honest client pointing away
    start, result = _round(deltas, np.ones(6))
    direction = result.outcome.aggregation["norm_bound"]["direction"]
    assert direction["zeroed"] == [0, 1, 2]
    # Two honest clients pointed the server's way, and the median is 0: refused, with why.
    assert result.vector is None
    assert result.outcome.update_refused == (
        "the direction check zeroed 3 of 5 rows, a majority, so the median is 0 on every "
        "coordinate: no update this round")


def test_a_round_with_half_zeroed_of_an_even_count_still_updates():
    """The refusal is for a median that is 0 everywhere only: 2 zeroed of 4 average a zero
    and a kept value in the middle."""
    deltas = np.ones((5, 6))
    deltas[:2] = -1.0
    deltas[4] = 2.0
    _, result = _round(deltas, np.ones(6))
    assert result.outcome.update_refused is None and result.vector is not None

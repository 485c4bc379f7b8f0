"""ATTACK33 (fixed: zero votes are at most a minority of the round): a round where a
majority of rows was zeroed made no update (the median of a
majority of zeros is 0 on every coordinate) but its outcome said a client contributed
(`no_contribution` false, no `update_refused`). `RoundOutcome.no_contribution` is "True when
no client's delta moved the aggregate this round". The limit makes such a round impossible:
the server's votes are never a majority."""

import numpy as np
import pytest
from aggregation_round import one_round

from fedtune.config import AggregationConfig

pytestmark = pytest.mark.usefixtures("task_identity")


def _round(deltas, reference_vector):
    cfg = AggregationConfig(rule="median", norm_bound="adaptive", tolerate=2,
                            norm_bound_direction="validation", direction_weighting="zero")
    return one_round(cfg, deltas, reference_vector)


def test_zero_votes_stay_a_minority_so_no_round_is_a_silent_no_op():
    """Adversary: tolerate = 2 clients of 5 that send the honest step reversed; with one
    honest non-IID client below the threshold beside them, three rows score below 0. Breaks
    (before the fix) the round record's contract (THREATS.md class 4: a round that makes
    no update says why, never silently). Fixed by the minority limit: the server zeroes at
    most floor((n - 1) / 2) rows, so its votes never make the median 0 on their own."""
    deltas = np.ones((5, 6))
    deltas[:3] = -1.0  # partitions 0, 1: attackers; 2: an honest client pointing away
    deltas[2] = -0.5
    start, result = _round(deltas, np.ones(6))
    direction = result.outcome.aggregation["norm_bound"]["direction"]
    assert direction["zeroed"] == [0, 1] and direction["kept_below"] == [2]
    assert result.outcome.update_refused is None and not result.outcome.no_contribution
    # The median of {0, 0, -0.5, 1, 1}: 0 on every coordinate is the rows' vote now, not the
    # server's; with the honest row at +0.5 instead, the round moves.
    deltas[2] = 0.5
    start, result = _round(deltas, np.ones(6))
    assert result.outcome.aggregation["norm_bound"]["direction"]["zeroed"] == [0, 1]
    assert not np.array_equal(result.vector, start)

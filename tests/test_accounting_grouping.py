"""`fedtune.privacy.accounting.grouped`: entries of one (sigma, q) are accounted as one
(composition commutes), so a split run's alternating DP-SGD and smashed entries cost the
accountant one pair, not one entry per round (ATTACK29E 3: 20 entries took 13-18 s)."""

import pytest

from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.accounting import _epsilon, grouped

ALTERNATING = [(1.0, 0.25, 5), (2.0, 0.125, 5)] * 4 + [(1.0, 0.25, 3)]


def test_grouping_sums_the_steps_of_each_pair_in_first_seen_order():
    assert grouped(tuple(ALTERNATING)) == ((1.0, 0.25, 23), (2.0, 0.125, 20))
    assert grouped(((1.0, 0.5, 2),)) == ((1.0, 0.5, 2),)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_grouped_history_has_the_epsilon_of_the_ungrouped_one(accountant):
    """What is accounted is the same composition: the epsilon agrees with the accountant
    run on the entries as they came."""
    history = DPHistory(list(ALTERNATING))
    ungrouped = _epsilon(tuple(ALTERNATING), 1e-5, accountant)
    assert epsilon_of(history, 1e-5, accountant) == pytest.approx(ungrouped, rel=2e-3)

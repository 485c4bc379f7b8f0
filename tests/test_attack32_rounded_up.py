"""ATTACK32: `rounded_up` (fedtune.run.epsilon_marks) undoes a product's rounding with an
absolute slack of 1e-9 of the last shown digit: `up - scaled > 1 - 1e-9` takes one unit
off. The slack cannot tell a product's error (8.00 x 100 = 800.0000000001) from an
accountant figure that IS just above a boundary, so an epsilon within 1e-9 of a unit above
one is shown rounded DOWN, below the accountant's value: 8.000000000001 shows as 8.00,
0.30000000000000004 (0.1 + 0.2) at six digits as 0.300000, and a budget stop's reason
(`reason_epsilon`, four digits) says an epsilon of 8.00000000000001 "would raise ... to
8.0000, over privacy.sample.target_epsilon=8". The shown value is compared here with the
accountant's figure as the run folder records it (its shortest repr, what summary.json and
rounds.jsonl hold), which a correct rounding up reaches without any float product
(e.g. `Decimal(repr(value)).quantize(Decimal(1).scaleb(-digits), ROUND_CEILING)`)."""

from decimal import Decimal

import pytest

from fedtune.run.epsilon_marks import reason_epsilon, render_epsilon, rounded_up

# (accountant's epsilon, digits shown): each a float just above a boundary of its digits.
JUST_ABOVE = [
    (8.000000000001, 2),  # console, sweep table, report.md
    (0.1 + 0.2, 6),  # 0.30000000000000004
    (8.00000000000001, 4),  # a budget stop's or refused claim's reason
    (1.000000000000001, 3),  # `fedtune audit split`'s epsilon_shown
]


@pytest.mark.parametrize(("value", "digits"), JUST_ABOVE)
def test_a_shown_epsilon_is_never_below_the_recorded_one(value, digits):
    """Adversary: none needed (the accountant's own figure); invariant: THREATS 2 (a
    reported epsilon is never below the accountant's value), as ATTACK31's fix claims for
    every shown epsilon."""
    shown = Decimal(rounded_up(value, digits))
    recorded = Decimal(repr(value))  # what summary.json / rounds.jsonl hold
    assert shown >= recorded, (
        f"accountant's epsilon {value!r} is shown as {shown} at {digits} digits, below it")


def test_a_budget_stop_reason_never_shows_the_budget_it_says_it_exceeds():
    """Adversary: none needed; invariant: THREATS 2 through a reason's epsilon
    (`reason_epsilon`): an epsilon over a target of 8 must not read 8.0000 in the reason
    that stops the run for exceeding 8."""
    after_round = 8.00000000000001
    assert after_round > 8.0  # the ledger stops the round
    assert reason_epsilon(after_round, []) != "8.0000"
    assert render_epsilon(after_round, []) != "8.00"

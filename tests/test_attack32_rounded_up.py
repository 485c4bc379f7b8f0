"""ATTACK32: `rounded_up` (fedtune.run.epsilon_marks) undoes a product's rounding with an
absolute slack of 1e-9 of the last shown digit: `up - scaled > 1 - 1e-9` takes one unit
off. The slack cannot tell a product's error (8.00 x 100 = 800.0000000001) from an
accountant figure that IS just above a boundary, so an epsilon within 1e-9 of a unit above
one is shown rounded DOWN, below the accountant's value: 8.000000000001 shows as 8.00,
0.30000000000000004 (0.1 + 0.2) at six digits as 0.300000, and a budget stop's reason
(`reason_epsilon`, four digits) says an epsilon of 8.00000000000001 "would raise ... to
8.0000, over privacy.sample.target_epsilon=8". The shown value is compared here with the
accountant's figure as the run folder records it (its shortest repr, what summary.json and
rounds.jsonl hold). Past about 1e8 the product itself also rounds down (fuzzed: 972 of
20,000 values in [1e8, 1e12) at four digits shown below their repr). A correct rounding up
reaches the recorded figure without any float product
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
    # Large values (a budget stop's reason for a given tiny noise multiplier: RDP at sigma
    # 1e-6 gives 5.5e12): value x 10^digits loses the last digits before the ceiling.
    (992688777424.6327, 4),  # shown as 992688777424.6326
    (6401292971078379.0, 3),  # shown as 6401292971078378.000
]


@pytest.mark.parametrize(("value", "digits"), JUST_ABOVE)
def test_a_shown_epsilon_is_never_below_the_recorded_one(value, digits):
    """Adversary: none (the data owner reading it); breaks THREATS 2: shown below accountant."""
    shown = Decimal(rounded_up(value, digits))
    recorded = Decimal(repr(value))  # what summary.json / rounds.jsonl hold
    assert shown >= recorded, (
        f"accountant's epsilon {value!r} is shown as {shown} at {digits} digits, below it")


def test_a_budget_stop_reason_never_shows_the_budget_it_says_it_exceeds():
    """Adversary: none (the operator reading a stop); breaks THREATS 2: a reason's epsilon below."""
    after_round = 8.00000000000001
    assert after_round > 8.0  # the ledger stops the round
    assert reason_epsilon(after_round, []) != "8.0000"
    assert render_epsilon(after_round, []) != "8.00"

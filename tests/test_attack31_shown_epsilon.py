"""ATTACK31: `fedtune.run.epsilon_marks.render_epsilon`, the one renderer of every epsilon
the console, the sweep table, report.md, `fedtune audit split` and (through
`reason_epsilon`) every budget-stop and claim-refusal reason show, rounds to the nearest
at its digits: an accountant's 7.994 is shown as 7.99, and a budget stop over
privacy.sample.target_epsilon=3 by 4e-5 reads "to 3.0000 [seeded noise], over
privacy.sample.target_epsilon=3". The standard: never report a smaller epsilon than the
accountant gives (the JSON keeps the exact value; what a person reads is rounded down)."""

import pytest

from fedtune.config import load_config
from fedtune.run.epsilon_marks import epsilon_marks, reason_epsilon, render_epsilon


@pytest.mark.parametrize(("value", "digits"), [(7.994, 2), (0.1418, 2), (3.00004, 4)])
def test_a_shown_epsilon_is_never_below_the_accountants(value, digits):
    """Adversary: none (whoever reads the console, report or a reason: the data owner
    deciding on the spend); invariant: the product standard "never report a smaller epsilon
    than the accountant gives" (THREATS 2 for what is shown)."""
    shown = render_epsilon(value, [], digits=digits)
    assert float(shown) >= value, f"accountant {value!r} shown as {shown}"


def test_a_budget_stop_reason_never_shows_its_epsilon_at_or_below_the_target():
    cfg = load_config(None, ["privacy.reproducible_noise=true"])
    text = reason_epsilon(3.00004, epsilon_marks(cfg, "sample"))
    assert float(text.split()[0]) > 3, (
        f"a stop over target 3 by 4e-5 reads 'to {text}, over "
        "privacy.sample.target_epsilon=3'")

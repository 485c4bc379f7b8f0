"""ATTACK31: where the docs describe the check against the server's validation direction
they still state the `tolerate` cap as the check's only behaviour: "dropped, at most
`tolerate`", "an honest client ... is dropped in an attacker's place (at most `tolerate` a
round)", "before `median` the cohort must be at least 3 x tolerate + 1". With
`direction_drop_limit = "majority"` (commit 56c2095) the check drops up to n - (2 x tolerate
+ 1) rows a round, honest ones included, and the cohort needs 2 x tolerate + 1: the
paragraphs a reader of the guarantees reads claim a tighter bound on lost honest rows than
the code holds. The refusal of `tolerate = 0` gives the cap's reason for the majority limit
too."""

import re
from pathlib import Path

import numpy as np
from config_refusals import refusal

import strategies.robust as robust
from fedtune.config import AggregationConfig

ROOT = Path(__file__).resolve().parents[1]


def _bullet(text: str, start: str) -> str:
    """The list item of `text` that begins with `start` (up to the next item)."""
    begin = text.index(start)
    rest = text[begin:]
    end = re.search(r"\n(- |\n)", rest[1:])
    return rest if end is None else rest[:end.start() + 1]


def _honest_rows_dropped(tolerate: int = 1) -> int:
    """Honest non-IID rows the majority limit drops in one round of six at `tolerate`."""
    reference = np.zeros(6)
    reference[0] = 1.0
    rows = np.eye(6)[[0, 1, 2, 3, 4, 5]]
    rows[1:4, 0] = -0.2  # three honest rows pointing a little away from the server's rows
    cfg = AggregationConfig(rule="median", norm_bound_direction="validation",
                            direction_drop_limit="majority", tolerate=tolerate)
    cfg.validate()
    out = robust.aggregate(rows, np.ones(6), cfg, reference=reference)
    return len(out.figures["direction"]["dropped"])


def test_the_strategies_doc_states_the_majority_limit_where_it_states_the_cap():
    """Adversary: none (a reader of the stated guarantee, as an operator choosing a rule);
    invariant: THREATS 5, "state the accuracy cost": the docs bound the honest rows lost a
    round by `tolerate`, which the majority limit passes."""
    assert _honest_rows_dropped() == 3  # three honest rows a round at tolerate 1
    bullet = _bullet((ROOT / "docs" / "strategies.md").read_text(),
                     "- **validation direction check**")
    assert "(at most `tolerate` a round)" not in bullet or "direction_drop_limit" in bullet, (
        "docs/strategies.md's validation direction check says an honest client is dropped "
        "'at most `tolerate` a round' and the median needs 3 x tolerate + 1, without the "
        "majority limit, which drops up to n - (2 x tolerate + 1) rows")


def test_the_robust_module_docstring_states_the_majority_limit_where_it_states_the_cap():
    """Adversary and invariant as above: strategies/robust.py's 'What each rule bounds'."""
    doc = robust.__doc__ or ""
    bullet = _bullet(doc, "- the check against the server's validation direction")
    assert "(at most `tolerate` a round)" not in bullet or "direction_drop_limit" in bullet, (
        "strategies/robust.py's module docstring bounds the honest rows the validation "
        "check drops by `tolerate` a round and asks 3f + 1 before the median, without the "
        "majority limit")


def test_the_refusal_of_tolerate_zero_with_the_majority_limit_names_its_own_reason():
    """Adversary: none (an operator's config); invariant: THREATS 8, a refusal names what is
    wrong: with the majority limit the check does not drop 'at most tolerate rows' (it would
    drop all but one row with tolerate 0)."""
    message = refusal(["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
                       "aggregation.direction_drop_limit=majority",
                       "data.validation_fraction=0.1", "aggregation.tolerate=0"])
    assert "drops at most aggregation.tolerate rows" not in message, message

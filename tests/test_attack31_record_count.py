"""ATTACK31: the round record's `aggregation.deltas` is documented as "how many deltas it
combined" (docs/strategies.md, the aggregation entry); it is the count before the direction
check, so with `direction_drop_limit = "majority"` a median of 2 x tolerate + 1 rows is
recorded as a combination of the whole round (7 where 3 counted). A reader who takes one
row's weight in the round from it (1 / deltas) underestimates it by the dropped rows."""

import numpy as np

from fedtune.config import AggregationConfig
from strategies import robust


def test_the_record_says_how_many_rows_the_median_combined():
    """Adversary: none (a reader of the record: the operator checking one client's weight);
    invariant: THREATS 5's record, the round says what the rule combined."""
    cfg = AggregationConfig(rule="median", norm_bound_direction="validation",
                            direction_drop_limit="majority", tolerate=1)
    cfg.validate()
    reference = np.zeros(7)
    reference[0] = 1.0
    rows = np.eye(7)
    rows[3:, 0] = -0.5  # four rows point away from the server's validation direction
    out = robust.aggregate(rows, np.ones(7), cfg, reference=reference)
    dropped = out.figures["direction"]["dropped"]
    assert len(dropped) == 4
    combined = 7 - len(dropped)
    assert out.figures["deltas"] == combined or "combined" in out.figures, (
        f"the record says deltas={out.figures['deltas']}, the median combined {combined} "
        f"(dropped {dropped})")

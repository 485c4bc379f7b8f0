"""ATTACK31: `aggregation.direction_drop_limit = "majority"` is stated to remove the attacker
that an honest row scoring below it used to keep in: `AggregationConfig` says "an honest row
that scores below an attacker no longer leaves the attacker in", `robust.direction_check`
"an honest row that scores below an attacker no longer costs the attacker's removal". The
limit still stops at 2 x tolerate + 1 rows, lowest first: once as many honest rows as the
limit allows score below a reversed row (two of four at tolerate 1, as DP-SGD noise gives,
the benchmark's seed-2 round had one at -0.36), they are dropped and the reversed row is
in the median. The median's own bound (the honest rows' range) holds; the stated removal
did not, and the claim is now the bound alone (the test holds that)."""

import numpy as np
from cosine_rows import rows_at

from fedtune.config import AggregationConfig
from strategies import robust


def _majority(tolerate: int = 1) -> AggregationConfig:
    cfg = AggregationConfig(rule="median", norm_bound_direction="validation",
                            direction_drop_limit="majority", tolerate=tolerate)
    cfg.validate()
    return cfg


def test_honest_rows_below_the_reversed_one_keep_it_in_and_the_median_in_range():
    """Adversary: one client of five that sends its step reversed (attack_simulation flip)
    under DP-SGD noise; invariant: THREATS 5 as the majority limit states it (an honest row
    scoring below the attacker no longer leaves the attacker in the median)."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=300)
    # Row 0 reversed (-0.23, the benchmark's DP seed-2 flipped row); honest rows 1 and 2
    # below it under noise (-0.36 as measured there, -0.30), rows 3 and 4 above 0.
    deltas = rows_at(reference, [-0.23, -0.36, -0.30, 0.30, 0.25], rng)
    out = robust.aggregate(deltas, np.ones(5), _majority(), reference=reference)
    dropped = out.figures["direction"]["dropped"]
    # The claim is restated (the config comment, direction_check's docstring): the limit
    # drops the lowest rows while 2 x tolerate + 1 are left and keeps the median's bound;
    # it does not promise the reversed row's removal. Held here: the honest rows were
    # dropped, the reversed row stayed, and the median is inside the honest rows' range.
    assert dropped == [1, 2]
    honest = deltas[1:]
    assert (out.delta >= honest.min(0)).all() and (out.delta <= honest.max(0)).all()

"""ATTACK30: the round record's `norm_bound.direction.capped` lists rows the cap never cut. With
`aggregation.tolerate = 0` the cap is 1 / n, and a round of equal trusted weights (a zero server
direction keeps every trust at 1; population_expansion's `lam` = 0.7 on every source row)
computes each uncapped share w / sum(w) a rounding over 1.0 / n, so every row is recorded as
capped while the update is the plain mean (THREATS.md class 3/4: the record is the audit trail
of the aggregation; the brief: every new figure correct)."""

import numpy as np
import pytest

from fedtune.config import AggregationConfig
from strategies import robust


@pytest.mark.parametrize("weight,n", [(0.7, 3), (0.1, 6), (0.1, 7)])
def test_an_equal_round_records_no_capped_row(weight, n):
    """No adversary: an honest round of equal weights, tolerate 0 (the record's `capped`)."""
    cfg = AggregationConfig(norm_bound=1.0, norm_bound_direction="validation",
                            direction_weighting="cosine", tolerate=0)
    cfg.validate()
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(n, 8)) * 0.01  # under the bound: nothing clipped
    out = robust.aggregate(deltas, np.full(n, weight), cfg, reference=np.zeros(8))
    weighted = out.figures["norm_bound"]["direction"]
    assert weighted["no_reference"] == list(range(n))  # the setting: every trust 1
    np.testing.assert_allclose(out.delta, deltas.mean(0), rtol=1e-12)  # the plain mean
    assert weighted["capped"] == [], (
        f"the record says rows {weighted['capped']} were capped at {weighted['share_cap']} "
        f"in a round of {n} equal weights, whose shares are {weighted['shares']}")

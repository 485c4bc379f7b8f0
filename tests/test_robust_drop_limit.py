"""`aggregation.direction_drop_limit = "majority"` (strategies.robust.direction_check before
`median`): the validation check drops every row below the threshold, the lowest first, as
long as 2 x tolerate + 1 rows are left, so an honest row that scores below a reversed one no
longer leaves the reversed row in the median (the eighth table's DP seed-2 miss); the median
of the rows left keeps its bound whichever rows were dropped; the default is unchanged; the
other combinations are refused in one line."""

import numpy as np
import pytest
from config_refusals import refusal
from cosine_rows import rows_at

from fedtune.config import AggregationConfig, load_config
from strategies import robust

MAJORITY = ["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
            "aggregation.direction_drop_limit=majority", "data.validation_fraction=0.1",
            "privacy.sample.enabled=false"]


def _cfg(**settings) -> AggregationConfig:
    cfg = AggregationConfig(**{"rule": "median", "norm_bound_direction": "validation",
                               **settings})
    cfg.validate()
    return cfg


def test_an_honest_row_below_the_reversed_one_no_longer_keeps_it_in():
    """The measured DP seed-2 round 3: the flipped row at -0.23, honest partition 1 at
    -0.36, three honest rows above 0."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=300)
    deltas = rows_at(reference, [-0.23, -0.36, 0.3, 0.25, 0.4], rng)
    capped = robust.aggregate(deltas, np.ones(5), _cfg(), reference=reference)
    assert capped.figures["direction"]["dropped"] == [1]  # the honest row, not the flipped
    out = robust.aggregate(deltas, np.ones(5), _cfg(direction_drop_limit="majority"),
                           reference=reference)
    assert out.figures["direction"]["dropped"] == [0, 1]
    np.testing.assert_allclose(out.delta, np.median(deltas[2:], axis=0))


def test_it_never_leaves_fewer_than_two_tolerate_plus_one_rows():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=50)
    deltas = rows_at(reference, [-0.5, -0.1, -0.4, -0.2, -0.3, -0.05, -0.6], rng)
    for tolerate, left in [(1, 3), (2, 5), (3, 7)]:
        out = robust.aggregate(deltas, np.ones(7), _cfg(direction_drop_limit="majority",
                                                        tolerate=tolerate),
                               reference=reference)
        kept = 7 - len(out.figures["direction"]["dropped"])
        assert kept == left
        lowest = np.argsort([-0.5, -0.1, -0.4, -0.2, -0.3, -0.05, -0.6])[:7 - left]
        assert sorted(out.figures["direction"]["dropped"]) == sorted(lowest.tolist())


@pytest.mark.parametrize("seed", range(40))
def test_the_median_stays_in_the_honest_range_whatever_is_dropped(seed):
    """f attackers of n (n >= 2f + 1) choose their rows to score high and the honest rows
    score low, so that the check drops honest rows: every coordinate of the result stays
    inside the honest rows' range (the median's bound)."""
    rng = np.random.default_rng(seed)
    f = int(rng.integers(1, 4))
    n = int(rng.integers(2 * f + 1, 2 * f + 6))
    d = 30
    reference = rng.normal(size=d)
    honest = rng.normal(size=(n - f, d)) - 0.3 * reference  # most score below 0
    attackers = 50 * reference + rng.normal(size=(f, d)) * 100  # far away, scoring high
    deltas = np.vstack([attackers, honest])
    out = robust.aggregate(deltas, np.ones(n), _cfg(direction_drop_limit="majority",
                                                    tolerate=f), reference=reference)
    assert out.delta is not None
    assert (out.delta >= honest.min(0) - 1e-12).all() and (out.delta <= honest.max(0) + 1e-12).all()


def test_the_default_still_drops_at_most_tolerate():
    assert AggregationConfig().direction_drop_limit == "tolerate"
    rng = np.random.default_rng(2)
    reference = rng.normal(size=40)
    deltas = rows_at(reference, [-0.5, -0.4, -0.3, 0.2, 0.3], rng)
    out = robust.aggregate(deltas, np.ones(5), _cfg(), reference=reference)
    assert out.figures["direction"]["dropped"] == [0]


def test_the_cohort_it_needs_is_the_medians():
    """The tolerate cap needs n >= 3f + 1 before the median (it may drop f honest rows);
    "majority" leaves 2f + 1 rows whatever it drops, so the median's own 2f + 1 is enough."""
    cfg = load_config(None, [*MAJORITY, "data.num_clients=3", "train.clients_per_round=3"])
    assert cfg.aggregation.direction_drop_limit == "majority"
    assert "3 x tolerate + 1" in refusal(["aggregation.rule=median",
                                          "aggregation.norm_bound_direction=validation",
                                          "data.validation_fraction=0.1",
                                          "data.num_clients=3", "train.clients_per_round=3"])
    assert "2 x tolerate + 1 = 3, got 2" in refusal([*MAJORITY, "data.num_clients=2",
                                                     "train.clients_per_round=2"])


@pytest.mark.parametrize("sets,needle", [
    (["aggregation.direction_drop_limit=all"], "aggregation.direction_drop_limit"),
    (["aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_drop_limit=majority", "data.validation_fraction=0.1"],
     "aggregation.direction_drop_limit='majority' needs aggregation.norm_bound_direction="
     "'validation' and aggregation.rule='median', got norm_bound_direction='validation', "
     "rule='mean'"),
    (["aggregation.rule=median", "aggregation.direction_drop_limit=majority"],
     "norm_bound_direction='off'"),
])
def test_other_combinations_are_refused_in_one_line(sets, needle):
    assert needle in refusal(sets)

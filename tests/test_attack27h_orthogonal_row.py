"""ATTACK27H: `aggregation.direction_weighting = "cosine"` renormalizes the trust weights, so a
row whose cosine to the server's validation direction is any positive number, however small
(1e-12, a denormal), takes the whole round when the other rows score <= 0, and the round
record showed it at cosine 0.0 and trust 0.0 (rounded to 4 places) beside a share of 1.0.
The record now keeps 4 significant digits, and each row's share is now capped at
1 / (n - tolerate) (`strategies.trust_weighting.share_cap`): such a row takes a quarter of a
round of five, not the round, which the first test holds."""

import numpy as np
import pytest
from cosine_rows import rows_at

from fedtune.config import AggregationConfig
from strategies import robust

# The cosines of four honest rows in a measured round (benchmarks/RESULTS.md, eighth table:
# 5-dp-validation_weighted_all-honest-s1, round 2, partitions 0-2 at <= 0) and two more
# below zero: a round where no honest row points the server's way.
HONEST_COSINES = (-0.0591, -0.1905, -0.2235, -0.0271)


def _weighted(deltas: np.ndarray, reference: np.ndarray, **settings):
    cfg = AggregationConfig(**{"norm_bound": "adaptive", "norm_bound_direction": "validation",
                               "direction_weighting": "cosine", **settings})
    cfg.validate()
    return robust.aggregate(deltas, np.ones(len(deltas)), cfg, reference=reference)


def _attack(cosine: float, d: int = 400, seed: int = 0):
    """Partition 0: a targeted change (exactly orthogonal to the server's direction: the two
    have disjoint supports) plus `cosine` of the server's direction, at the honest rows'
    norm; partitions 1-4: honest rows at <= 0."""
    rng = np.random.default_rng(seed)
    reference = np.concatenate([rng.normal(size=d // 2), np.zeros(d - d // 2)])
    honest = rows_at(reference, HONEST_COSINES, rng)
    target = np.concatenate([np.zeros(d // 2), rng.normal(size=d - d // 2)])
    target /= np.linalg.norm(target)
    attacker = target + cosine * reference / np.linalg.norm(reference)
    return np.vstack([attacker, honest]), reference, target


@pytest.mark.parametrize("cosine", [1e-12, 1e-300])
def test_a_row_orthogonal_to_the_server_direction_moves_the_model_by_the_stated_bound(cosine):
    """One client of 5, targeted change at cosine ~0 (class 5: the bound the docs state)."""
    # The docs (docs/strategies.md, strategies/trust_weighting.py): "a targeted change with a
    # positive cosine counts in proportion to it". Renormalized over a round whose other rows
    # score <= 0, a cosine of 1e-12 (or 1e-300) carries the whole round: the bound, along the
    # target.
    deltas, reference, target = _attack(cosine)
    out = _weighted(deltas, reference)
    bound = out.figures["norm_bound"]["bound"]
    assert out.delta is not None
    along_target = float(out.delta @ target)
    # Renormalized, it carried the round (the whole bound along its target); capped, it
    # takes 1 / (n - tolerate) of it, and the round moves no further.
    shares = dict(out.figures["norm_bound"]["direction"]["shares"])
    assert shares[0] == 0.25 and out.figures["norm_bound"]["direction"]["capped"] == [0]
    assert along_target <= bound / (5 - 1) + 1e-9
    assert np.linalg.norm(out.delta) <= bound / (5 - 1) + 1e-9


@pytest.mark.parametrize("cosine", [1e-12, 1e-5])
def test_the_record_does_not_show_zero_trust_for_the_row_that_carried_the_round(cosine):
    """One client of 5 at a tiny cosine (class 4/5: the record's trust figure hides its share)."""
    # The round record is the aggregation's audit trail (docs/strategies.md: each row's
    # cosine, trust and share; "a row at cosine <= 0 weighs 0"): the row that carried the
    # round reads cosine 0.0 and trust 0.0 (rounded to 4 places) beside a share of 1.0.
    deltas, reference, _ = _attack(cosine)
    figures = _weighted(deltas, reference).figures["norm_bound"]["direction"]
    trust, shares = dict(figures["trust"]), dict(figures["shares"])
    cosines = dict(figures["cosines"])
    assert shares[0] == 0.25  # the setting of the case: partition 0 takes its capped share
    assert trust[0] > 0.0 and cosines[0] > 0.0, (
        f"the record shows partition 0 at cosine {cosines[0]} and trust {trust[0]} with a "
        f"share of {shares[0]}")

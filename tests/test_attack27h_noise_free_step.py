"""ATTACK27H: under sample-level DP-SGD the honest rows' cosines to the server's validation
direction are small (noise), so with `direction_weighting = "cosine"` one client that skips
the noise and sends a clean step with a targeted component takes most of each round: far
more than "as with the bound alone", which the docs said: a share of 0.53 of a round of
five, 0.50 B along the target, before each row's share was capped at 1 / (n - tolerate)
(`strategies.trust_weighting.share_cap`). This test holds the cap, the capped drop's
B / (n - 1), for the weighting and for the drop on the same rows."""

import numpy as np
import pytest
from cosine_rows import rows_at

from fedtune.config import AggregationConfig
from strategies import robust

# Honest cosines measured under DP-SGD (benchmarks/RESULTS.md, eighth table, the round
# records of 5-dp-validation_weighted_all-honest-s1: round 2 partitions 1-4, round 3
# partitions 0-4); the attacker takes partition 0's place.
MEASURED_DP = (-0.1905, -0.2235, 0.1003, 0.4134, 0.0255, -0.0956, -0.0718, 0.0581, 0.2044)
# A clean (noise-free) honest step scored 0.33-0.69 at the same round of the same seed
# without DP (5-nodp-validation_weighted_all-honest-s1, round 3, partitions 0-2); the
# attacker spends 0.3 of its direction on the server's way and the rest on its target.
ATTACKER_COSINE = 0.3


@pytest.mark.parametrize("honest", [MEASURED_DP[5:], MEASURED_DP], ids=["of5", "of10"])
def test_a_noise_free_step_under_dp_moves_the_model_by_the_stated_bound(honest):
    """One client of 5 or 10 skipping DP noise (class 5: the bound the docs state)."""
    # The client sends cos 0.3 of the server's way plus a targeted change, at the bound; the
    # server cannot tell it skipped DP-SGD. The docs say a row pointing the server's way
    # weighs as an honest row "as with the bound alone" (B / n); the test allows the capped
    # drop's B / (n - f) at f = 1, which the same rows under "drop" meet (the control).
    rng = np.random.default_rng(0)
    d = 2000
    reference = rng.normal(size=d)
    unit = reference / np.linalg.norm(reference)
    target = rng.normal(size=d)
    target -= (target @ unit) * unit
    target /= np.linalg.norm(target)
    attacker = ATTACKER_COSINE * unit + np.sqrt(1 - ATTACKER_COSINE ** 2) * target
    deltas = np.vstack([attacker, rows_at(reference, honest, rng)])  # every row at norm 1
    n = len(deltas)

    def aggregate(weighting: str) -> robust.Aggregated:
        cfg = AggregationConfig(norm_bound="adaptive", norm_bound_direction="validation",
                                direction_weighting=weighting)
        cfg.validate()
        return robust.aggregate(deltas, np.ones(n), cfg, reference=reference)

    # The control: the capped drop (tolerate 1) keeps the attacker at its 1 / (n - 1) share.
    dropped = aggregate("drop")
    assert float(dropped.delta @ target) <= dropped.figures["norm_bound"]["bound"] / (n - 1)
    out = aggregate("cosine")
    bound = out.figures["norm_bound"]["bound"]
    share = dict(out.figures["norm_bound"]["direction"]["shares"])[0]
    along_target = float(out.delta @ target)
    assert share <= 1 / (n - 1) + 1e-4  # was 0.53 of five, renormalized
    assert along_target <= bound / (n - 1) + 1e-9, (share, along_target / bound)

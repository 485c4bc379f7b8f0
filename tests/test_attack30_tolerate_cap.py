"""ATTACK30: with the trust weighting and a fixed norm bound, the config accepts
`aggregation.tolerate` >= `train.clients_per_round` (`shortfall` floors the adaptive bound and
the median centre only), where the stated cap 1 / (cohort - tolerate) has no value;
`strategies.trust_weighting.share_cap` then clamps it to 1 in silence (max(n - f, 1)): no cap,
and the ATTACK27H row at cosine 1e-12 carries every round of 5 again. Its docstring says "the
config and `shortfall` keep the adaptive bound above that"; nothing keeps the fixed bound
(THREATS.md classes 5 and 8: a refusal names the key and its range, nothing silently clamped)."""

import numpy as np
import pytest

from fedtune.config import AggregationConfig, ConfigError, load_config
from strategies import robust

COSINE = ["privacy.sample.enabled=false", "data.validation_fraction=0.1",
          "train.clients_per_round=5", "aggregation.norm_bound=1.0",
          "aggregation.norm_bound_direction=validation", "aggregation.direction_weighting=cosine"]


@pytest.mark.parametrize("tolerate", [5, 9])
def test_a_tolerate_the_cohort_cannot_hold_is_refused_at_load(tolerate):
    """The operator's config (class 8: one-line refusal; class 5: the stated cap must exist)."""
    with pytest.raises(ConfigError, match="aggregation.tolerate"):
        load_config(None, [*COSINE, f"aggregation.tolerate={tolerate}"])


def test_a_round_of_no_more_rows_than_tolerate_is_refused_not_uncapped():
    """One hostile client of 5 at cosine 1e-12, tolerate 5 (class 5: the cap, not renormalized)."""
    cfg = AggregationConfig(norm_bound=1.0, norm_bound_direction="validation",
                            direction_weighting="cosine", tolerate=5)
    cfg.validate()
    d = 40
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(size=d // 2), np.zeros(d // 2)])
    target = np.concatenate([np.zeros(d // 2), rng.normal(size=d // 2)])
    target /= np.linalg.norm(target)
    rows = np.tile(-reference / np.linalg.norm(reference), (5, 1))  # honest rows score -1
    rows[0] = target + 1e-12 * reference / np.linalg.norm(reference)
    out = robust.aggregate(rows, np.ones(5), cfg, reference=reference)
    if out.delta is not None:
        shares = dict(out.figures["norm_bound"]["direction"]["shares"])
        pytest.fail(f"a round of 5 rows with tolerate 5 ran with share_cap "
                    f"{out.figures['norm_bound']['direction']['share_cap']}: the row at cosine "
                    f"1e-12 took {shares[0]} of it, {float(out.delta @ target):.4f} B along its "
                    "target (refuse the round, as `shortfall` does for the adaptive bound)")

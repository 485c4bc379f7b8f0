"""ATTACK34: the zero vote's minority limit is floor((n - 1) / 2), 0 for a round of one or two
rows, and the config accepts `direction_weighting = "zero"` with `tolerate = 0` for a cohort
of 1 or 2: a defence that can never zero a row in any round of the run, while the drop check
with nothing to drop (`tolerate = 0`) is refused in one line for that reason."""

import numpy as np
from config_refusals import refusal

from fedtune.config import AggregationConfig
from strategies import robust

SETS = ["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
        "aggregation.direction_weighting=zero", "aggregation.tolerate=0"]


def test_a_cohort_the_zero_vote_can_never_act_on_is_refused():
    """Adversary: 1 of 2 clients, reversed; breaks THREATS 8/5: an inert zero vote accepted."""
    sets = [*SETS, "train.clients_per_round=2", "data.num_clients=2"]
    cfg = AggregationConfig(rule="median", norm_bound_direction="validation",
                            direction_weighting="zero", tolerate=0)
    cfg.validate()  # the table alone; the cohort is the loaded config's (below)
    honest = np.array([1.0, 2.0, 3.0])
    out = robust.aggregate(np.vstack([-honest, honest]), np.ones(2), cfg,
                           reference=honest, cohort=2)
    direction = out.figures["direction"]
    # The reversed row is below the threshold and kept: the limit of a 2-row round is 0,
    # and the median of the two rows cancels the honest step.
    assert direction["zeroed"] == [] and direction["kept_below"] == [0]
    assert direction["zero_limit"] == 0 and np.allclose(out.delta, 0.0)
    # The drop check with nothing it may drop is refused; the zero vote must be too.
    assert "tolerate >= 1" in refusal(["aggregation.rule=median",
                                       "aggregation.norm_bound_direction=validation",
                                       "aggregation.tolerate=0"])
    message = refusal(sets)
    assert "aggregation.direction_weighting" in message and "clients_per_round" in message
    # A cohort of 3 (one zero vote) stays accepted: tests/test_robust_zero_vote.py,
    # test_the_cohort_needs_the_medians_majority_not_the_drop_checks.


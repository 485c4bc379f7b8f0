"""ATTACK31: the validation check before `mean` with a numeric norm bound has no cohort
requirement at all (`AggregationConfig.shortfall` checks the median's 2f + 1, the others'-
median check's 2f + 2 and the adaptive bound's 2f + 1, none of which applies), so a round of
no more rows than `tolerate` (a cohort configured so, or clients that failed, as the brief's
"partial cohorts") can have every row dropped. `robust.aggregate` then runs `mean` over no
row: the "update" is a vector of zeros, applied, with nothing refused, and the round record
says a client contributed (`no_contribution: false`). A run whose every round drops every
row ends as a trained one instead of `NoContributionError`; the record's figures are not
truthful."""

import numpy as np
import pytest
import torch
from config_refusals import refusal
from conftest import FakeGrid
from wire import reply

from fedtune.config import AggregationConfig
from fedtune.wire.delta import DeltaSpec
from strategies import DeltaFedAvg, robust

SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})
REFERENCE = np.array([1.0, 1, 1, 1, 1, 1])


def _checked(tolerate: int) -> AggregationConfig:
    cfg = AggregationConfig(norm_bound=1.0, norm_bound_direction="validation",
                            tolerate=tolerate)
    cfg.validate()
    return cfg


def test_a_round_whose_every_row_is_dropped_makes_no_update():
    """Adversary: none needed (one honest non-IID row below the threshold in a round where
    the others failed), or the tolerated attackers alone; invariant: THREATS 5's record
    (the round says which rows counted) and the rule's own refusal path (`shortfall`: too
    few rows for the rule's bound -> no update, the reason recorded)."""
    out = robust.aggregate(-np.ones((1, 6)), np.ones(1), _checked(tolerate=1),
                           reference=REFERENCE)
    # Refused before the check (`shortfall`: n > tolerate), or by it; either way no update.
    assert "refused" in out.figures
    assert out.delta is None, (
        f"every row was dropped, yet the round's update is {out.delta} with nothing "
        f"refused: {out.figures}")


@pytest.mark.usefixtures("task_identity")
def test_the_round_record_says_nobody_contributed_when_every_row_was_dropped():
    """As above, through the strategy: a cohort of 3 at tolerate 1, two clients silent
    (failed), the one reply pointing against the server's validation direction."""
    strategy = DeltaFedAvg(SPEC, 3, seed=0, aggregation=_checked(tolerate=1),
                           reference=lambda vector: REFERENCE)
    strategy.roster = {i: 11 + i for i in range(3)}
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    start = np.arange(6, dtype=np.float32)
    sent = strategy.configure_train(1, start, 0.1, cohort)
    first = sent.messages[0]
    result = strategy.aggregate_train(sent, [reply(first, -np.ones(6), SPEC, n=10)])
    assert "refused" in result.outcome.aggregation
    assert result.outcome.no_contribution or result.outcome.update_refused, (
        "the only row was dropped by the validation check, yet the round record says a "
        "client contributed and no update was refused")


def test_a_cohort_the_check_may_drop_entirely_is_refused_at_load():
    """Adversary: none (the operator's config); invariant: THREATS 8 and the load check
    (`check_cohort`, the same test as each round's): tolerate >= the cohort lets the check
    drop every row of every full round; the cosine weighting's n > tolerate (ATTACK30) is
    the drop's need too."""
    message = refusal(["aggregation.norm_bound=1.0",
                       "aggregation.norm_bound_direction=validation",
                       "data.validation_fraction=0.1", "aggregation.tolerate=3",
                       "data.num_clients=2", "train.clients_per_round=2"])
    assert "aggregation.tolerate" in message and "train.clients_per_round" in message

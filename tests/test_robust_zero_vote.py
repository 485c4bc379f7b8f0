"""The validation check's zero vote before the median (`aggregation.direction_weighting =
"zero"`, strategies.zero_vote and strategies.robust): the rows below the threshold become
zero rows, the lowest first and at most a minority of the round, none is dropped, the
median runs over the whole round and stays inside the range of the values that are not an
attacker's (the honest rows and 0) whichever rows are zeroed; the cohort needs 2 x
tolerate + 1 rows (the median's), not the drop check's 3 x tolerate + 1; every other
combination is refused in one line."""

import json

import numpy as np
import pytest
from aggregation_round import one_round
from config_refusals import refusal

from fedtune.config import AggregationConfig, load_config
from strategies import robust
from strategies.zero_vote import zero_limit

pytestmark = pytest.mark.usefixtures("task_identity")

ZEROED = {"rule": "median", "norm_bound_direction": "validation", "direction_weighting": "zero"}


def _zeroed(deltas, reference, **settings):
    cfg = AggregationConfig(**{**ZEROED, **settings})
    cfg.validate()
    return robust.aggregate(deltas, np.ones(len(deltas)), cfg, reference=reference,
                            cohort=len(deltas))


def test_a_row_against_the_server_votes_zero_and_the_median_takes_every_row():
    ref = np.ones(4)
    honest = np.array([[1.0, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7]])
    deltas = np.vstack([-10 * honest[0], honest])
    out = _zeroed(deltas, ref)
    np.testing.assert_allclose(out.delta, np.median(np.vstack([np.zeros(4), honest]), axis=0))
    direction = out.figures["direction"]
    assert direction["weighting"] == "zero" and direction["zeroed"] == [0]
    assert out.figures["combined"] == 5 and "dropped" not in direction


def test_an_honest_row_scoring_below_the_reversed_one_no_longer_keeps_it_in():
    """The drop check's failure before the median (benchmarks/RESULTS.md, eighth table):
    capped at one row it dropped the honest row at -0.36 and kept the reversed one at -0.2;
    here both are zeroed."""
    ref = np.array([1.0, 0.0])
    reversed_row = np.array([-1.0, 5.0])     # cosine about -0.2
    low_honest = np.array([-1.0, 2.6])       # cosine about -0.36
    rest = np.array([[1.0, 0.2], [1.2, -0.1], [0.9, 0.3]])
    deltas = np.vstack([reversed_row, low_honest, rest])
    out = _zeroed(deltas, ref)
    assert out.figures["direction"]["zeroed"] == [0, 1]
    np.testing.assert_allclose(out.delta, np.median(np.vstack([np.zeros((2, 2)), rest]), axis=0))
    drop = AggregationConfig(rule="median", norm_bound_direction="validation")
    drop.validate()
    dropped = robust.aggregate(deltas, np.ones(5), drop, reference=ref)
    assert dropped.figures["direction"]["dropped"] == [1]  # the reversed row stayed


@pytest.mark.parametrize("bound", ["off", "adaptive", 0.5])
def test_the_median_stays_in_the_range_of_the_rows_that_are_not_an_attackers(bound):
    """Whatever f attackers send (reversed, boosted, orthogonal, aligned with the server at
    any size) and whichever rows are zeroed, each coordinate of the result lies within the
    range of the honest rows (bounded as the rule bounds them) and 0."""
    rng = np.random.default_rng(27)
    for trial in range(400):
        n = int(rng.integers(3, 10))
        f = int(rng.integers(1, (n - 1) // 2 + 1))
        d = int(rng.integers(2, 12))
        ref = rng.normal(size=d)
        honest = rng.normal(size=(n - f, d)) + rng.normal() * ref
        kind = trial % 4
        attack = {0: -rng.uniform(1, 1e6) * honest[:f],
                  1: rng.uniform(1, 1e6) * np.tile(ref, (f, 1)),
                  2: rng.normal(size=(f, d)) * rng.uniform(1, 1e6),
                  3: rng.uniform(1, 1e6) * honest[:f]}[kind]
        deltas = np.vstack([attack, honest])
        cfg = {"tolerate": f}
        if bound != "off":
            cfg["norm_bound"] = bound
        out = _zeroed(deltas, ref, **cfg)
        zeroed = out.figures.get("norm_bound", out.figures)["direction"]["zeroed"]
        assert out.delta is not None and len(zeroed) <= (n - 1) // 2
        bounded = deltas
        if bound != "off":
            limit = out.figures["norm_bound"]["bound"]
            bounded = robust.clip_rows(deltas, limit)[0]
        allowed = np.vstack([bounded[f:], np.zeros(d)])
        assert (out.delta >= allowed.min(0) - 1e-9).all(), trial
        assert (out.delta <= allowed.max(0) + 1e-9).all(), trial
        if bound != "off":
            assert np.linalg.norm(out.delta) <= np.sqrt(2) * limit * (1 + 1e-9)


def test_zero_votes_are_a_minority_the_lowest_first():
    """Three of five rows below the threshold: the two lowest vote zero, the third stays
    (named), so the server's votes alone never make the median 0."""
    ref = np.array([1.0, 0.0])
    deltas = np.array([[-1.0, 0.1], [1.0, 1.0], [-1.0, 3.0], [2.0, 0.5], [-1.0, 0.0]])
    out = _zeroed(deltas, ref)
    direction = out.figures["direction"]
    assert direction["zeroed"] == [0, 4] and direction["kept_below"] == [2]
    assert direction["zero_limit"] == 2 == zero_limit(5)
    kept = deltas.copy()
    kept[[0, 4]] = 0.0
    np.testing.assert_allclose(out.delta, np.median(kept, axis=0))
    assert [zero_limit(n) for n in range(1, 8)] == [0, 0, 1, 1, 2, 2, 3]


def test_a_round_where_every_row_points_away_still_moves_by_the_median():
    out = _zeroed(-np.ones((5, 3)), np.ones(3))
    assert out.figures["direction"]["zeroed"] == [0, 1]
    np.testing.assert_allclose(out.delta, -np.ones(3))


def test_a_zero_reference_zeroes_no_row():
    deltas = np.random.default_rng(1).normal(size=(5, 4))
    out = _zeroed(deltas, np.zeros(4))
    assert out.figures["direction"]["zeroed"] == []
    assert out.figures["direction"]["no_reference"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(out.delta, np.median(deltas, axis=0))


def test_the_threshold_is_direction_min_cosine():
    ref = np.array([1.0, 0.0])
    deltas = np.array([[1.0, 1.0], [1.0, 0.1], [1.0, 0.0], [1.0, 3.0], [0.0, 1.0]])
    out = _zeroed(deltas, ref, direction_min_cosine=0.5)
    assert out.figures["direction"]["zeroed"] == [3, 4]  # cosines 0.32 and 0
    assert out.figures["direction"]["min_cosine"] == 0.5


def test_the_figures_are_bounded_by_the_cohort_not_the_model():
    out = _zeroed(np.random.default_rng(2).normal(size=(5, 100_000)), np.ones(100_000))
    direction = out.figures["direction"]
    assert len(direction["cosines"]) == 5 and len(direction["zeroed"]) <= 5
    assert len(json.dumps(out.figures)) < 2_000


def test_the_cohort_needs_the_medians_majority_not_the_drop_checks():
    sets = ["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
            "train.clients_per_round=3", "data.num_clients=3"]
    cfg = load_config(None, [*sets, "aggregation.direction_weighting=zero"])
    assert cfg.aggregation.direction_weighting == "zero"
    assert "3 x tolerate + 1" in refusal(sets)
    assert "2 x tolerate + 1" in refusal(
        [*sets[:2], "train.clients_per_round=2", "data.num_clients=2",
         "aggregation.direction_weighting=zero"])
    # tolerate 0: the median of every row, zeros included.
    assert load_config(None, [*sets, "aggregation.direction_weighting=zero",
                              "aggregation.tolerate=0"]).aggregation.tolerate == 0


@pytest.mark.parametrize("sets,needle", [
    (["aggregation.direction_weighting=zero"],
     "aggregation.direction_weighting='zero' needs aggregation.norm_bound_direction="
     "'validation' and aggregation.rule='median', got norm_bound_direction='off', "
     "rule='mean'"),
    (["aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_weighting=zero"], "rule='mean'"),
    (["aggregation.rule=trimmed_mean", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_weighting=zero"], "aggregation.rule"),
    (["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_weighting=zero", "aggregation.direction_drop_limit=majority"],
     "aggregation.direction_weighting='zero' drops no row: aggregation.direction_drop_limit "
     "must stay 'tolerate', got 'majority'"),
])
def test_bad_combinations_are_refused_in_one_line(sets, needle):
    assert needle in refusal(sets)


def _round(deltas, reference_vector):
    return one_round(AggregationConfig(**ZEROED, norm_bound="adaptive"), deltas,
                     reference_vector)


def test_the_round_record_names_the_rows_zeroed():
    deltas = np.ones((5, 6))
    deltas[0] = -1.0
    start, result = _round(deltas, np.ones(6))
    np.testing.assert_allclose(result.vector, start + 1, rtol=1e-6)
    direction = result.outcome.aggregation["norm_bound"]["direction"]
    assert direction["zeroed"] == [0] and [p for p, _ in direction["cosines"]] == [0, 1, 2, 3, 4]


def test_a_round_with_most_rows_against_the_server_is_not_refused():
    deltas = np.ones((5, 6))
    deltas[:3] = -1.0
    start, result = _round(deltas, np.ones(6))
    assert result.outcome.update_refused is None
    assert result.outcome.aggregation["norm_bound"]["direction"]["zeroed"] == [0, 1]
    # The median of {0, 0, -1, 1, 1} is 0 on every coordinate: that is the rows' own vote.
    np.testing.assert_allclose(result.vector, start, rtol=1e-6)


@pytest.mark.slow
def test_a_real_round_loop_zeroes_the_flipped_row(tmp_path, monkeypatch):
    """Wiring, one tiny in-process run (the real round loop and ClientApp handlers): the
    server computes its reference each round and the round records name the rows zeroed,
    the lowest below the threshold, a minority of the round, every row counted in the
    median (the tiny model's honest rows often point away from 8 validation rows)."""
    from inline_grid import TINY, inline_run

    sets = [*TINY, "data.num_clients=4", "train.clients_per_round=4", "train.rounds=2",
            "privacy.sample.enabled=false", "aggregation.rule=median",
            "aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation",
            "aggregation.direction_weighting=zero", "aggregation.direction_reference_rows=8",
            "faults.attack_simulation.kind=flip", "faults.attack_simulation.partitions=[0]"]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    summary, _, _ = inline_run(cfg, out, monkeypatch)
    assert summary["rounds"] == 2
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        direction = record["aggregation"]["norm_bound"]["direction"]
        assert direction["weighting"] == "zero"
        assert direction["reference"] == robust.VALIDATION_REFERENCE
        cosines = dict(direction["cosines"])
        assert sorted(cosines) == [0, 1, 2, 3]
        below = sorted((p for p in cosines if cosines[p] < 0.0), key=lambda p: cosines[p])
        assert direction["zeroed"] == sorted(below[:1])  # zero_limit(4) = 1
        assert direction["kept_below"] == sorted(below[1:])
        assert not record.get("update_refused") and record["aggregation"]["combined"] == 4

"""FLTrust's trust score as an aggregation weighting (`aggregation.direction_weighting =
"cosine"`, strategies.trust_weighting and strategies.robust): after the norm bound each row
weighs its server-owned weight x max(0, cosine to the server's validation direction), no
row is dropped, each row's share is capped at 1 / (cohort - tolerate) and not renormalized,
a round where every weight is 0 makes no update (no division by 0, the reason recorded,
the run goes on), the figures hold one entry per row, and every other combination is
refused in one line."""

import json

import numpy as np
import pytest
from aggregation_round import one_round
from config_refusals import refusal

from fedtune.config import AggregationConfig, ConfigError, load_config
from strategies import robust
from strategies.trust_weighting import ZERO_TRUST, trust_scores

pytestmark = pytest.mark.usefixtures("task_identity")

WEIGHTED = {"norm_bound": "adaptive", "norm_bound_direction": "validation",
            "direction_weighting": "cosine"}


def _weighted(deltas, reference, weights=None, **settings):
    cfg = AggregationConfig(**{**WEIGHTED, **settings})
    cfg.validate()
    weights = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=float)
    return robust.aggregate(deltas, weights, cfg, reference=reference)


def _unit_cos(row, ref):
    return float(row @ ref / (np.linalg.norm(row) * np.linalg.norm(ref)))


def test_each_row_weighs_its_weight_times_its_positive_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50)
    deltas = rng.normal(size=(5, 50)) + 0.3 * ref
    deltas[0] = -deltas[1]  # a reversed row: cosine < 0, weight 0
    weights = np.array([1.0, 2.0, 1.0, 3.0, 1.0])
    out = _weighted(deltas, ref, weights)
    bound = out.figures["norm_bound"]["bound"]
    clipped, _ = robust.clip_rows(deltas, bound)
    cosines = np.array([_unit_cos(r, ref) for r in clipped])
    trust = np.maximum(cosines, 0.0)
    assert trust[0] == 0.0 and (trust[1:] > 0).all()  # the setting of the case
    shares = np.minimum(weights * trust / (weights * trust).sum(), 1 / (5 - 1))
    assert (shares < weights * trust / (weights * trust).sum()).any()  # the cap bites here
    np.testing.assert_allclose(out.delta, (clipped * shares[:, None]).sum(0), rtol=1e-12)
    figures = out.figures["norm_bound"]["direction"]
    assert figures["weighting"] == "cosine"
    assert figures["reference"] == robust.VALIDATION_REFERENCE
    np.testing.assert_allclose([c for _, c in figures["cosines"]], cosines, atol=1e-4)
    np.testing.assert_allclose([t for _, t in figures["trust"]], trust, atol=1e-4)
    np.testing.assert_allclose([s for _, s in figures["shares"]], shares, atol=1e-4)
    assert figures["share_cap"] == 0.25
    assert figures["capped"] == [i for i in range(5) if shares[i] == 0.25]
    assert figures["zero_weight"] == [0] and "dropped" not in figures


def test_every_row_against_the_direction_weighs_zero_whatever_tolerate_says():
    """The drop check removes at most `tolerate` rows (the lowest): with two reversed rows
    it keeps one. The weighting gives both 0; `tolerate` only sets its share cap."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=40)
    honest = rng.normal(size=(6, 40)) * 0.5 + ref
    deltas = honest.copy()
    deltas[2], deltas[4] = -honest[2], -3 * honest[4]
    out = _weighted(deltas, ref)
    figures = out.figures["norm_bound"]["direction"]
    assert figures["zero_weight"] == [2, 4]
    bound = out.figures["norm_bound"]["bound"]
    clipped, _ = robust.clip_rows(deltas, bound)
    kept = [0, 1, 3, 5]
    trust = np.array([_unit_cos(clipped[i], ref) for i in kept])
    shares = np.minimum(trust / trust.sum(), 1 / (6 - 1))  # four kept rows of six
    np.testing.assert_allclose(out.delta, (clipped[kept] * shares[:, None]).sum(0))
    drop = _weighted(deltas, ref, direction_weighting="drop")
    assert len(drop.figures["norm_bound"]["direction"]["dropped"]) == 1


def test_a_round_where_every_weight_is_zero_makes_no_update():
    ref = np.array([1.0, 0.0, 0.0])
    deltas = np.array([[-1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [-0.5, 0.0, 1.0],
                       [-2.0, 1.0, 1.0], [0.0, 0.0, -1.0]])  # every cosine <= 0
    with np.errstate(all="raise"):  # nothing divides by the zero sum
        out = _weighted(deltas, ref)
    assert out.delta is None and out.figures["refused"] == ZERO_TRUST
    figures = out.figures["norm_bound"]["direction"]
    assert figures["zero_weight"] == [0, 1, 2, 3, 4]
    assert all(s == 0.0 for _, s in figures["shares"])
    assert all(np.isfinite(c) for _, c in figures["cosines"])


def test_zero_rows_give_no_nan():
    """Zero rows (a client that did not move) have cosine 0 and weight 0; with one honest
    row the update is that row at its capped share, finite; with only zero rows the round
    is refused."""
    ref = np.ones(4)
    deltas = np.zeros((5, 4))
    deltas[3] = [1.0, 2.0, 0.5, 1.0]
    with np.errstate(all="raise"):
        out = _weighted(deltas, ref, norm_bound=10.0)
        assert np.isfinite(out.delta).all()
        np.testing.assert_allclose(out.delta, deltas[3] / (5 - 1))
        none = _weighted(np.zeros((5, 4)), ref, norm_bound=10.0)
    assert none.delta is None and none.figures["refused"] == ZERO_TRUST
    # The adaptive bound of a cohort of zero rows is 0: still no NaN, still refused.
    with np.errstate(divide="raise", invalid="raise"):
        adaptive = _weighted(np.zeros((5, 4)), ref)
    assert adaptive.delta is None


def test_a_single_kept_row_moves_the_model_by_at_most_its_capped_share():
    """The bound the docstring states: one row with the only positive cosine takes its
    capped share, B / (n - tolerate), not the whole round (review ATTACK27H)."""
    ref = np.array([1.0, 0.0])
    deltas = np.array([[50.0, 50.0], [-1.0, 0.5], [-1.0, -0.5], [-0.5, 1.0], [0.0, 1.0]])
    out = _weighted(deltas, ref)
    bound = out.figures["norm_bound"]["bound"]
    assert out.figures["norm_bound"]["direction"]["zero_weight"] == [1, 2, 3, 4]
    assert out.figures["norm_bound"]["direction"]["capped"] == [0]
    assert np.linalg.norm(out.delta) == pytest.approx(bound / (5 - 1), rel=1e-12)


def test_a_zero_reference_keeps_the_server_weights():
    deltas = np.random.default_rng(2).normal(size=(5, 8))
    out = _weighted(deltas, np.zeros(8))
    figures = out.figures["norm_bound"]["direction"]
    assert figures["no_reference"] == [0, 1, 2, 3, 4] and figures["zero_weight"] == []
    clipped, _ = robust.clip_rows(deltas, out.figures["norm_bound"]["bound"])
    np.testing.assert_allclose(out.delta, clipped.mean(0))
    np.testing.assert_array_equal(trust_scores(np.array([-0.5, 0.3]), np.array([True, False])),
                                  [1.0, 0.3])


def test_the_figures_are_bounded_by_the_cohort_not_the_model():
    def size(d):
        rng = np.random.default_rng(3)
        return len(json.dumps(_weighted(rng.normal(size=(5, d)), rng.normal(size=d)).figures))

    assert abs(size(100) - size(100_000)) < 80  # only the rounded figures' digits differ


def test_drop_is_the_default_and_unchanged():
    assert AggregationConfig().direction_weighting == "drop"
    rng = np.random.default_rng(4)
    deltas, ref = rng.normal(size=(5, 20)), rng.normal(size=20)
    cfg = AggregationConfig(norm_bound="adaptive", norm_bound_direction="validation")
    cfg.validate()
    out = robust.aggregate(deltas, np.ones(5), cfg, reference=ref)
    assert "weighting" not in out.figures["norm_bound"]["direction"]
    assert "dropped" in out.figures["norm_bound"]["direction"]


@pytest.mark.parametrize("sets,needle", [
    (["aggregation.direction_weighting=cosine"],
     "aggregation.direction_weighting='cosine' needs aggregation.norm_bound_direction="
     "'validation', aggregation.rule='mean' and aggregation.norm_bound set, got "
     "norm_bound_direction='off'"),
    (["aggregation.rule=median", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_weighting=cosine"], "rule='median'"),
    (["aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=median",
      "aggregation.direction_weighting=cosine"], "norm_bound_direction='median'"),
    (["aggregation.rule=median", "aggregation.norm_bound=adaptive",
      "aggregation.norm_bound_direction=validation", "aggregation.direction_weighting=cosine"],
     "rule='median'"),
    (["aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation",
      "aggregation.direction_weighting=cosine", "aggregation.direction_min_cosine=0.1"],
     "aggregation.direction_min_cosine must stay 0, got 0.1"),
    (["aggregation.direction_weighting=relu"],
     "aggregation.direction_weighting"),
])
def test_bad_combinations_are_refused_in_one_line(sets, needle):
    assert needle in refusal(sets)


def test_tolerate_zero_loads_and_caps_every_share_at_one_over_the_cohort():
    cfg = load_config(None, ["aggregation.norm_bound=1.5",
                             "aggregation.norm_bound_direction=validation",
                             "aggregation.direction_weighting=cosine",
                             "aggregation.tolerate=0"])
    assert cfg.aggregation.direction_weighting == "cosine" and cfg.aggregation.tolerate == 0
    deltas = np.vstack([np.full(3, 1.0), -np.ones((4, 3))])
    out = robust.aggregate(deltas, np.ones(5), cfg.aggregation, reference=np.ones(3))
    assert out.figures["norm_bound"]["direction"]["share_cap"] == 0.2
    np.testing.assert_allclose(out.delta, 0.2 * robust.clip_rows(deltas[:1], 1.5)[0][0])
    # "drop" still needs a cap of at least one row.
    with pytest.raises(ConfigError, match="drops at most aggregation.tolerate rows"):
        load_config(None, ["aggregation.norm_bound=1.5",
                           "aggregation.norm_bound_direction=validation",
                           "aggregation.tolerate=0"])


@pytest.mark.parametrize(("weighting", "rule"), [("cosine", "median"), ("zero", "mean")])
def test_aggregate_refuses_a_settings_object_built_around_validation(weighting, rule):
    """Each weighting of the validation check with the rule it is refused with (the zero
    vote's own tests: tests/test_robust_zero_vote.py)."""
    cfg = AggregationConfig(rule=rule, norm_bound_direction="validation",
                            direction_weighting=weighting)  # never validated
    with pytest.raises(ValueError, match=f"direction_weighting='{weighting}' needs"):
        robust.aggregate(np.eye(5), np.ones(5), cfg, reference=np.ones(5))


def _round(deltas, reference_vector):
    return one_round(AggregationConfig(**WEIGHTED), deltas, reference_vector)


def test_the_round_record_carries_each_rows_cosine_and_trust():
    deltas = np.ones((5, 6))
    deltas[0] = -1.0
    start, result = _round(deltas, np.ones(6))
    np.testing.assert_allclose(result.vector, start + 1, rtol=1e-6)
    weighted = result.outcome.aggregation["norm_bound"]["direction"]
    assert [pid for pid, _ in weighted["cosines"]] == [0, 1, 2, 3, 4]
    assert dict(weighted["trust"]) == {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert dict(weighted["shares"]) == {0: 0.0, 1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}
    assert weighted["zero_weight"] == [0]


def test_a_zero_trust_round_keeps_the_global_and_says_why():
    deltas = -np.ones((5, 6))  # every row against the server's direction
    _, result = _round(deltas, np.ones(6))
    assert result.vector is None
    assert result.outcome.update_refused == ZERO_TRUST
    assert result.outcome.aggregation["norm_bound"]["direction"]["zero_weight"] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_a_real_round_loop_weights_every_row_by_its_trust(tmp_path, monkeypatch):
    """Wiring, one tiny in-process run (the real round loop and ClientApp handlers): the
    server computes its reference each round, every row is weighted (none dropped), the
    round records carry each row's cosine, trust and share."""
    from inline_grid import TINY, inline_run

    sets = [*TINY, "data.num_clients=4", "train.clients_per_round=4", "train.rounds=2",
            "privacy.sample.enabled=false", "aggregation.norm_bound=adaptive",
            "aggregation.norm_bound_direction=validation",
            "aggregation.direction_weighting=cosine",
            "aggregation.direction_reference_rows=8",
            "faults.attack_simulation.kind=flip", "faults.attack_simulation.partitions=[0]"]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    summary, _, _ = inline_run(cfg, out, monkeypatch)
    assert summary["rounds"] == 2
    for line in (out / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        weighted = record["aggregation"]["norm_bound"]["direction"]
        assert weighted["weighting"] == "cosine"
        assert weighted["reference"] == robust.VALIDATION_REFERENCE
        cosines, trust = dict(weighted["cosines"]), dict(weighted["trust"])
        assert sorted(cosines) == sorted(trust) == [0, 1, 2, 3]
        assert all(trust[p] == pytest.approx(max(0.0, cosines[p]), abs=1e-4) for p in trust)
        assert weighted["zero_weight"] == [p for p in trust if trust[p] == 0.0]
        shares = dict(weighted["shares"])
        assert weighted["share_cap"] == pytest.approx(1 / 3, abs=1e-4)  # 4 rows, tolerate 1
        assert all(s <= weighted["share_cap"] for s in shares.values())
        if record.get("update_refused"):
            assert record["update_refused"] == ZERO_TRUST and not any(shares.values())
        else:
            assert 0.0 < sum(shares.values()) <= 1.0 + 1e-3
        assert record["aggregation"]["deltas"] == 4

"""Robust aggregation (strategies.robust): each rule against Flower's own strategy on the same
deltas, the bound on one client's influence, the wiring into DeltaFedAvg, the attack
simulation, and the `[aggregation]` config's refusals."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from wire import reply

from clients.faults import attack
from fedtune.config import (
    AGGREGATION_RULES,
    AggregationConfig,
    AttackSimulationConfig,
    ConfigError,
    load_config,
)
from fedtune.wire.delta import DeltaSpec
from strategies import DeltaFedAvg, robust

pytestmark = pytest.mark.usefixtures("task_identity")


def _deltas(n=5, d=40, seed=0, outlier=None):
    deltas = np.random.default_rng(seed).normal(size=(n, d))
    if outlier is not None:
        deltas[0] = deltas[0] / np.linalg.norm(deltas[0]) * outlier
    return deltas


def _flower(strategy, deltas, weights):
    """Flower's strategy aggregating `deltas` sent as replies (num-examples = weights)."""
    replies = []
    for i, (delta, w) in enumerate(zip(deltas, weights, strict=True)):
        asked = Message(content=RecordDict({"config": ConfigRecord({})}),
                        message_type=MessageType.TRAIN, dst_node_id=i + 1)
        content = RecordDict({"arrays": ArrayRecord({"v": Array(np.asarray(delta))}),
                              "metrics": MetricRecord({"num-examples": int(w)})})
        replies.append(Message(content=content, reply_to=asked))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["v"].numpy()


def _ours(deltas, weights, **settings):
    cfg = AggregationConfig(**settings)
    cfg.validate()
    return robust.aggregate(deltas, weights, cfg)


def test_registry_names_are_the_configs():
    assert set(robust.RULES) == set(AGGREGATION_RULES)


@pytest.mark.parametrize("n", [5, 6, 10])
@pytest.mark.parametrize(("settings", "flower"), [
    ({"rule": "mean"}, lambda n: FedAvg()),
    ({"rule": "median"}, lambda n: FedMedian()),
    ({"rule": "trimmed_mean", "trim_beta": 0.2}, lambda n: FedTrimmedAvg(beta=0.2)),
    ({"rule": "trimmed_mean", "trim_beta": 0.4}, lambda n: FedTrimmedAvg(beta=0.4)),
    ({"rule": "krum", "krum_f": 1}, lambda n: Krum(num_malicious_nodes=1)),
    ({"rule": "multi_krum", "krum_f": 1, "multi_krum_m": 3},
     lambda n: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3)),
    ({"rule": "multi_krum", "krum_f": 1},  # m = 0: n - f
     lambda n: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=n - 1)),
])
def test_each_rule_matches_flowers_strategy(n, settings, flower):
    deltas = _deltas(n, outlier=50.0)
    weights = np.arange(1, n + 1) * 7  # uneven weights: only mean and Multi-Krum use them
    ours = _ours(deltas, weights, **settings)
    np.testing.assert_allclose(ours.delta, _flower(flower(n), deltas, weights), rtol=1e-12,
                               atol=1e-12)
    assert ours.figures["rule"] == settings["rule"]


def test_trimmed_mean_and_krum_figures():
    deltas = _deltas(10, outlier=1e9)
    trimmed = _ours(deltas, np.ones(10), rule="trimmed_mean", trim_beta=0.2)
    assert (trimmed.figures["trim_beta"], trimmed.figures["trimmed_per_side"]) == (0.2, 2)
    chosen = robust.aggregate(deltas, np.ones(10), AggregationConfig(rule="multi_krum",
                                                                     multi_krum_m=4),
                              ids=list(range(100, 110)))
    assert len(chosen.figures["selected"]) == 4 and 100 not in chosen.figures["selected"]


def test_krum_distances_survive_a_huge_outlier():
    # Flower's ||x||^2 + ||y||^2 - 2xy loses the honest distances next to a 1e9 norm;
    # the direct differences keep them, so Krum still picks an honest delta.
    deltas = _deltas(5, outlier=1e9)
    scores = robust.krum_scores(deltas, f=1)
    assert np.argmax(scores) == 0
    honest = deltas[1:]
    expected = robust.krum_scores(honest, f=0)  # 4 honest, n - f - 2 = 2 neighbours each
    np.testing.assert_allclose(scores[1:], expected, rtol=1e-9)


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_norm_bound_limits_one_clients_influence_to_bound_over_cohort(rule):
    bound, n = 2.0, 5
    attacked = _deltas(n, outlier=1e9)
    silent = attacked.copy()
    silent[0] = 0.0  # the attacker sending nothing
    a = _ours(attacked, np.ones(n), rule=rule, norm_bound=bound)
    b = _ours(silent, np.ones(n), rule=rule, norm_bound=bound)
    moved = float(np.linalg.norm(a.delta - b.delta))
    assert moved <= bound / n * (1 + 1e-12) if rule == "mean" else moved <= bound
    assert 0 in a.figures["norm_bound"]["clipped"]
    assert a.figures["norm_bound"] == {"setting": bound, "bound": bound,
                                       "clipped": a.figures["norm_bound"]["clipped"]}


def _honest_step(n=5, d=40, seed=0, spread=0.3):
    """Honest deltas: one shared step plus each client's own noise (DP-SGD's, its data's)."""
    rng = np.random.default_rng(seed)
    step = rng.normal(size=d)
    return step, step + spread * rng.normal(size=(n, d))


@pytest.mark.parametrize("bound", ["adaptive", 2.0])
def test_centred_bound_pulls_any_row_to_the_centre_and_bounds_every_row_around_zero(bound):
    """Whatever client 0 sends, its row is first pulled within the centred bound of the
    cohort's coordinate-wise median, then every row is bounded around zero as without a
    centre: the aggregate's norm and one client's pull stay within the bound around zero."""
    n = 5
    _, honest = _honest_step(n)
    for sent in (-10 * honest[0], 1e9 * honest[0], np.full(40, 3e7), honest[0]):
        attacked = honest.copy()
        attacked[0] = sent
        cfg = AggregationConfig(norm_bound=bound, norm_bound_center="median")
        cfg.validate()
        rows, used, _, zero_bound = robust.centred_clip(attacked, cfg)
        center = np.median(attacked, axis=0)
        norms = np.linalg.norm(attacked, axis=1)
        if bound == "adaptive":
            assert used == pytest.approx(np.median(np.linalg.norm(attacked - center, axis=1)))
            # The largest norm that is an honest one with tolerate = 1 of 5 attacking.
            assert zero_bound == pytest.approx(np.sort(norms)[3])
        else:
            assert used == zero_bound == bound
        assert (np.linalg.norm(rows, axis=1) <= zero_bound * (1 + 1e-12)).all()
        # Before the bound around zero the attacker's row is within the centred bound of
        # the centre; the bound around zero only shortens a row.
        pulled, _ = robust.clip_rows(attacked - center, used)
        assert np.linalg.norm(pulled[0]) <= used * (1 + 1e-12)
        out = _ours(attacked, np.ones(n), norm_bound=bound, norm_bound_center="median")
        np.testing.assert_allclose(out.delta, rows.mean(0), rtol=1e-12, atol=1e-15)
        assert out.figures["norm_bound"]["center"] == "median"
        assert out.figures["norm_bound"]["bound_zero"] == zero_bound


def test_numeric_centred_bound_still_bounds_the_aggregate_beyond_tolerance():
    """A numeric norm bound B keeps the aggregate's norm <= B whatever the cohort sends, also
    when more clients attack than `tolerate` (here one of two, tolerate 0): the median centre
    is then the attacker's, and only the bound around zero holds (ATTACK27C)."""
    bound = 1.0
    honest = np.full(40, 0.01)
    attacker = np.full(40, 3.0e38, dtype=np.float32).astype(np.float64)
    for center in ("zero", "median"):
        out = _ours(np.stack([honest, attacker]), np.ones(2), norm_bound=bound,
                    norm_bound_center=center, tolerate=0)
        assert np.linalg.norm(out.delta) <= bound, center


def test_centred_bound_cuts_a_reversed_step_that_a_bound_around_zero_keeps():
    """The flip attack of the poisoning table: one client of five sends -10 x its step. A
    bound around zero clips it to an honest norm, and that still cancels about one honest
    client; the centred bound leaves at most the honest spread of it."""
    n = 5
    step, honest = _honest_step(n, spread=0.3)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    clean = _ours(honest, np.ones(n), norm_bound="adaptive").delta
    zero = _ours(attacked, np.ones(n), norm_bound="adaptive").delta
    centred = _ours(attacked, np.ones(n), norm_bound="adaptive", norm_bound_center="median")
    along = step / np.linalg.norm(step)
    progress = {name: float(v @ along) / float(clean @ along)
                for name, v in (("zero", zero), ("centred", centred.delta))}
    assert progress["zero"] < 0.65  # about 3/5 of the honest step
    # The bound around zero then shortens the rows over the median norm (half the honest
    # ones), which costs a little of the honest step.
    assert progress["centred"] > 0.85, progress
    # With nobody attacking, nothing is clipped beyond the honest spread: about the mean.
    calm = _ours(honest, np.ones(n), norm_bound="adaptive", norm_bound_center="median")
    assert float(calm.delta @ along) / float(clean @ along) > 0.9


# -- the centre chosen from the server's own privacy setting (norm_bound_center = "auto")


@pytest.mark.parametrize(("sample_dp", "center"), [(True, "median"), (False, "zero")])
def test_auto_centre_follows_the_servers_sample_dp_setting(sample_dp, center):
    """The server knows whether its clients run DP-SGD (its own config): "auto" centres the
    bound on the cohort's median under sample-level DP and on zero without it, and then
    aggregates exactly as the centre it names."""
    cfg = load_config(None, [f"privacy.sample.enabled={str(sample_dp).lower()}",
                             "aggregation.norm_bound=adaptive",
                             "aggregation.norm_bound_center=auto"])
    resolved = cfg.aggregation.for_sample_dp(cfg.privacy.sample.enabled)
    assert resolved.norm_bound_center == center
    assert cfg.aggregation.norm_bound_center == "auto"  # a copy: the config keeps "auto"
    _, honest = _honest_step(5)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    out = robust.aggregate(attacked, np.ones(5), resolved)
    named = _ours(attacked, np.ones(5), norm_bound="adaptive", norm_bound_center=center)
    np.testing.assert_array_equal(out.delta, named.delta)
    assert out.figures == named.figures


@pytest.mark.parametrize("center", ["zero", "median"])
@pytest.mark.parametrize("sample_dp", [True, False])
def test_a_named_centre_is_kept_whatever_the_privacy_setting(center, sample_dp):
    cfg = AggregationConfig(norm_bound=1.0, norm_bound_center=center)
    cfg.validate()
    assert cfg.for_sample_dp(sample_dp) == cfg


def test_an_unresolved_auto_centre_is_refused_not_guessed():
    cfg = AggregationConfig(norm_bound="adaptive", norm_bound_center="auto")
    cfg.validate()
    with pytest.raises(ValueError, match="norm_bound_center='auto' must be resolved"):
        robust.aggregate(_deltas(), np.ones(5), cfg)


@pytest.mark.parametrize(("sample_dp", "check"), [(True, "off"), (False, "median")])
def test_auto_direction_check_runs_only_without_sample_dp(sample_dp, check):
    """`norm_bound_direction = "auto"`: the check without DP-SGD, off with it (the clients'
    DP noise swamps the direction); with `norm_bound_center = "auto"` the pair is the
    centred bound under DP-SGD and the checked bound around zero without it."""
    cfg = load_config(None, [f"privacy.sample.enabled={str(sample_dp).lower()}",
                             "aggregation.norm_bound=adaptive",
                             "aggregation.norm_bound_center=auto",
                             "aggregation.norm_bound_direction=auto"])
    resolved = cfg.aggregation.for_sample_dp(cfg.privacy.sample.enabled)
    assert (resolved.norm_bound_center, resolved.norm_bound_direction) == (
        ("median", "off") if sample_dp else ("zero", "median"))
    assert cfg.aggregation.norm_bound_direction == "auto"
    _, honest = _honest_step(5)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    out = robust.aggregate(attacked, np.ones(5), resolved)
    named = _ours(attacked, np.ones(5), norm_bound="adaptive",
                  norm_bound_center=resolved.norm_bound_center, norm_bound_direction=check)
    np.testing.assert_array_equal(out.delta, named.delta)
    assert out.figures == named.figures
    assert ("direction" in out.figures["norm_bound"]) == (check == "median")


def test_an_unresolved_auto_direction_is_refused_not_guessed():
    cfg = AggregationConfig(norm_bound="adaptive", norm_bound_direction="auto")
    cfg.validate()
    with pytest.raises(ValueError, match="norm_bound_direction='auto' must be resolved"):
        robust.aggregate(_deltas(), np.ones(5), cfg)


def _direction(deltas, weights=None, ids=None, **settings):
    cfg = AggregationConfig(**{"norm_bound": "adaptive", "norm_bound_direction": "median",
                               **settings})
    cfg.validate()
    n = len(deltas)
    return robust.aggregate(deltas, np.ones(n) if weights is None else weights, cfg, ids)


def test_direction_check_drops_a_flipped_row_and_keeps_the_honest_ones():
    """The flip attack: one client of five sends -10 x its step. After the bound its cosine
    to the cohort's coordinate-wise median is negative and it is dropped from the mean (the
    round record names it); the honest rows, all at a positive cosine, are kept and the
    aggregate is their mean (no longer the 3/5 of the step the bound around zero leaves)."""
    n = 5
    step, honest = _honest_step(n, spread=0.3)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    ids = [10, 11, 12, 13, 14]
    out = _direction(attacked, ids=ids)
    check = out.figures["norm_bound"]["direction"]
    assert check["dropped"] == [10]
    assert (check["reference"], check["min_cosine"]) == ("median of the others", 0.0)
    cosines = dict(check["cosines"])
    assert cosines[10] < 0 and all(cosines[i] > 0 for i in ids[1:])
    bound = out.figures["norm_bound"]["bound"]
    kept, _ = robust.clip_rows(attacked[1:], bound)
    np.testing.assert_allclose(out.delta, kept.mean(0), rtol=1e-12, atol=1e-15)
    clean = _ours(honest, np.ones(n), norm_bound="adaptive").delta
    along = step / np.linalg.norm(step)
    assert float(out.delta @ along) / float(clean @ along) > 0.9
    # With nobody attacking nothing is dropped: the plain bound's aggregate, exactly.
    calm = _direction(honest)
    assert calm.figures["norm_bound"]["direction"]["dropped"] == []
    np.testing.assert_array_equal(calm.delta, clean)


def test_direction_check_weights_the_kept_rows_by_their_own_weights():
    _, honest = _honest_step(5)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    w = np.array([1e6, 1.0, 2.0, 3.0, 4.0])  # the attacker's weight no longer counts
    out = _direction(attacked, weights=w, norm_bound=50.0)
    np.testing.assert_allclose(out.delta, (honest[1:] * w[1:, None]).sum(0) / w[1:].sum(),
                               rtol=1e-12)


@pytest.mark.parametrize("bound", ["adaptive", 2.0])
def test_direction_check_keeps_the_norm_bound_on_any_input(bound):
    """Whatever client 0 sends (reversed, huge, orthogonal to the median, just above the
    threshold, zero, float32's largest), every kept row is within the bound around zero, so
    the aggregate is; at most `tolerate` rows are dropped; a kept row never points against
    the reference by more than the threshold; no NaN."""
    n = 5
    _, honest = _honest_step(n)
    center = np.median(honest, axis=0)
    ortho = np.random.default_rng(7).normal(size=40)
    ortho -= (ortho @ center) / (center @ center) * center
    sent = [-10 * honest[0], 1e9 * honest[0], 1e3 * ortho, -center + 1e-3 * ortho,
            np.zeros(40), np.full(40, 3.4e38), honest[0]]
    for row in sent:
        attacked = honest.copy()
        attacked[0] = row
        out = _direction(attacked, norm_bound=bound)
        figs = out.figures["norm_bound"]
        assert np.isfinite(out.delta).all()
        assert np.linalg.norm(out.delta) <= figs["bound"] * (1 + 1e-12)
        assert len(figs["direction"]["dropped"]) <= 1
        assert all(np.isfinite(c) and -1 <= c <= 1 for _, c in figs["direction"]["cosines"])
        dropped = [c for i, c in figs["direction"]["cosines"]
                   if i in figs["direction"]["dropped"]]
        kept = [c for i, c in figs["direction"]["cosines"]
                if i not in figs["direction"]["dropped"]]
        # A kept row below the threshold only once `tolerate` rows are dropped, all lower.
        assert min(kept) >= 0.0 or (len(dropped) == 1 and max(dropped) <= min(kept))


def test_direction_check_drops_at_most_tolerate_rows_the_lowest_cosines():
    """More rows below the threshold than the tolerated attackers: only the `tolerate`
    lowest are dropped (the others are honest: with at most f attackers, dropping more would
    drop honest clients and hand the kept ones a larger share)."""
    rows = np.array([[-3.0, 0.0], [-1.0, 0.5], [1.0, 1.0], [2.0, 1.0], [1.0, 2.0],
                     [1.5, 1.5]])
    out = _direction(rows, norm_bound=100.0, direction_min_cosine=0.9)
    check = out.figures["norm_bound"]["direction"]
    cos = dict(check["cosines"])
    assert sum(c < 0.9 for c in cos.values()) >= 2
    assert check["dropped"] == [0]
    out = _direction(rows, norm_bound=100.0, direction_min_cosine=0.9, tolerate=2)
    assert out.figures["norm_bound"]["direction"]["dropped"] == [0, 1]


def test_direction_check_is_nan_free_on_zero_rows_and_a_zero_reference():
    """A zero row has cosine 0 (kept at the default threshold 0); a row whose reference is
    zero (the others' median is 0: no direction) is never dropped."""
    rows = np.zeros((5, 6))
    out = _direction(rows, norm_bound=1.0)
    assert np.array_equal(out.delta, np.zeros(6))
    check = out.figures["norm_bound"]["direction"]
    assert check["dropped"] == [] and check["no_reference"] == [0, 1, 2, 3, 4]
    rows[0] = 5.0
    rows[1:3] = 1.0
    rows[3:] = -1.0  # the others' median is 0 for row 0 only
    out = _direction(rows, norm_bound=1.0, direction_min_cosine=0.5)
    check = out.figures["norm_bound"]["direction"]
    assert check["no_reference"] == [0] and 0 not in check["dropped"]
    assert np.isfinite(out.delta).all()


def test_each_row_is_checked_against_the_median_of_the_others():
    """The reference of row i is the coordinate-wise median of the other rows (computed
    from one sort): a row cannot turn the direction it is checked against."""
    rng = np.random.default_rng(5)
    for n in (3, 4, 5, 6, 11):
        rows = rng.normal(size=(n, 30)).round(1)  # rounded: ties too
        expected = np.stack([np.median(np.delete(rows, i, axis=0), axis=0)
                             for i in range(n)])
        np.testing.assert_allclose(robust.median_of_others(rows), expected, rtol=0,
                                   atol=1e-15)


def test_a_flipped_row_that_drags_the_cohorts_median_is_still_dropped():
    """Non-IID honest rows (a weak shared step): a reversed row at an honest norm pulls
    the median of the whole cohort towards itself, enough for its cosine to that median to
    turn positive; against the median of the others it stays negative and is dropped."""
    rng = np.random.default_rng(2)
    step = rng.normal(size=200)
    honest = 0.4 * step + rng.normal(size=(5, 200))
    attacked = honest.copy()
    attacked[0] = -honest[0]
    whole = np.median(attacked, axis=0)
    assert attacked[0] @ whole > 0  # the whole cohort's median would keep it
    out = _direction(attacked, norm_bound=100.0)
    assert out.figures["norm_bound"]["direction"]["dropped"] == [0]


def test_direction_check_refuses_a_cohort_too_small_for_an_honest_median():
    cfg = AggregationConfig(norm_bound=1.0, norm_bound_direction="median")
    cfg.validate()
    _, honest = _honest_step(4)
    assert robust.aggregate(honest, np.ones(4), cfg).delta is not None
    refused = robust.aggregate(honest[:3], np.ones(3), cfg)
    assert refused.delta is None
    assert refused.figures["refused"] == (
        "aggregation.norm_bound_direction='median' tolerates aggregation.tolerate=1 only "
        "with deltas this round >= 2 x tolerate + 2 = 4 (each row's reference, the median "
        "of the others, needs an honest majority), got 3")


def test_direction_check_composes_with_the_centred_bound():
    _, honest = _honest_step(5)
    attacked = honest.copy()
    attacked[0] = -10 * honest[0]
    out = _direction(attacked, norm_bound_center="median")
    # Centring has already pulled the reversed row to the honest spread around the median
    # (a positive cosine): the check then keeps it, and the bound around zero holds.
    check = out.figures["norm_bound"]["direction"]
    assert dict(check["cosines"])[0] > 0 and check["dropped"] == []
    assert np.linalg.norm(out.delta) <= out.figures["norm_bound"]["bound_zero"] * (1 + 1e-12)


def test_without_a_bound_the_mean_is_the_attackers():
    # The finding: at an honest weight, one delta of norm 1e6 becomes the aggregate.
    attacked = _deltas(5, outlier=1e6)
    plain = _ours(attacked, np.ones(5), rule="mean")
    assert np.linalg.norm(plain.delta) > 1e5
    bounded = _ours(attacked, np.ones(5), rule="mean", norm_bound="adaptive")
    honest_median = np.median(np.linalg.norm(attacked, axis=1))
    assert bounded.figures["norm_bound"]["bound"] == pytest.approx(honest_median)
    assert np.linalg.norm(bounded.delta) <= honest_median


def test_clipped_rows_never_exceed_the_bound():
    deltas = _deltas(20, d=1000, seed=3) * np.logspace(-3, 30, 20)[:, None]
    clipped, over = robust.clip_rows(deltas, 1.7)
    assert np.all(np.linalg.norm(clipped, axis=1) <= 1.7)
    np.testing.assert_array_equal(clipped[~over], deltas[~over])


def test_median_ignores_one_outlier_of_five():
    for outlier in (1e3, 1e9, -1e9):
        deltas = _deltas(5, outlier=outlier)
        got = _ours(deltas, np.ones(5), rule="median").delta
        honest = deltas[1:]
        assert np.all(got >= honest.min(0)) and np.all(got <= honest.max(0))


def test_zero_weight_clients_are_left_out_and_none_when_nobody_counts():
    deltas = _deltas(5, outlier=1e9)
    got = _ours(deltas, [0, 1, 1, 1, 1], rule="median")
    np.testing.assert_array_equal(got.delta, np.median(deltas[1:], axis=0))
    assert got.figures["deltas"] == 4
    assert robust.aggregate(deltas, np.zeros(5), AggregationConfig()) is None


@pytest.mark.parametrize(("settings", "fewest"), [
    ({"rule": "median"}, 3),  # n >= 2f + 1
    ({"rule": "median", "tolerate": 2}, 5),
    ({"rule": "mean", "norm_bound": "adaptive"}, 3),  # the median norm: an honest one
    ({"rule": "trimmed_mean", "trim_beta": 0.2}, 3),  # cuts max(1, floor(0.2 n)) < n / 2
    ({"rule": "trimmed_mean", "trim_beta": 0.4, "tolerate": 0}, 3),  # floor(0.4 n) >= 1
    ({"rule": "krum", "krum_f": 1}, 5),  # n >= 2f + 3
    ({"rule": "multi_krum", "krum_f": 1, "multi_krum_m": 5}, 6),  # m <= n - f
    ({"rule": "mean", "norm_bound": 1.0}, 1),
])
def test_too_few_deltas_for_the_rules_bound_refuse_the_update(settings, fewest):
    cfg = AggregationConfig(**settings)
    cfg.validate()
    deltas = _deltas(10, outlier=1e9)
    ran = robust.aggregate(deltas[:fewest], np.ones(fewest), cfg)
    assert ran.delta is not None and "refused" not in ran.figures
    if fewest > 1:
        refused = robust.aggregate(deltas[:fewest - 1], np.ones(fewest - 1), cfg)
        assert refused.delta is None
        assert "deltas this round" in refused.figures["refused"]
        # The configured cohort is refused by the same rule, at load.
        with pytest.raises(ConfigError, match="train.clients_per_round"):
            cfg.check_cohort(fewest - 1)
    cfg.check_cohort(fewest)


def test_trimmed_mean_cuts_at_least_the_tolerated_attackers():
    # 4 deltas x beta 0.2 would cut floor(0.8) = 0 (the mean); tolerating 1 it cuts 1.
    deltas = _deltas(4, outlier=1e9)
    got = _ours(deltas, np.ones(4), rule="trimmed_mean", trim_beta=0.2)
    assert got.figures["trimmed_per_side"] == 1
    np.testing.assert_allclose(got.delta, np.sort(deltas, axis=0)[1:3].mean(0), rtol=1e-12)


# -- wired into the round

SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})


def _round(settings, deltas):
    strategy = DeltaFedAvg(SPEC, len(deltas), seed=0,
                           aggregation=AggregationConfig(**settings))
    strategy.roster = {i: 11 + i for i in range(len(deltas))}
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    sent = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    replies = [reply(by_pid[pid], deltas[pid], SPEC, n=10) for pid in sorted(by_pid)]
    result = strategy.aggregate_train(sent, replies)
    return result.vector, result.outcome


def test_delta_fedavg_runs_the_configured_rule_and_records_it():
    deltas = np.tile(np.arange(1.0, 6.0)[:, None], (1, 6))  # client i sends i+1 everywhere
    deltas[0] = 1e30  # finite in float32, the attacker
    new, outcome = _round({"rule": "median"}, deltas)
    np.testing.assert_array_equal(new, np.full(6, 4.0, np.float32))  # median of 1e30,2..5
    assert outcome.aggregation == {"rule": "median", "deltas": 5}
    new, outcome = _round({"rule": "mean", "norm_bound": 1.0}, deltas)
    assert np.linalg.norm(new) <= 1.0 + 1e-6
    assert outcome.aggregation["norm_bound"]["clipped"] == [0, 1, 2, 3, 4]


def test_delta_fedavg_default_is_fedavg_and_keeps_the_overflow_guard():
    new, outcome = _round({}, np.array([[1.0] * 6, [3.0] * 6]))
    np.testing.assert_array_equal(new, np.full(6, 2.0, np.float32))
    assert outcome.aggregation == {"rule": "mean", "deltas": 2}
    # A finite aggregate that takes the global past float32's limit keeps the global.
    strategy = DeltaFedAvg(SPEC, 2, seed=0)
    strategy.roster = {0: 11, 1: 12}
    sent = strategy.configure_train(1, np.full(6, 3e38, np.float32), 0.1, [0, 1])
    result = strategy.aggregate_train(sent, [reply(m, np.full(6, 3.4e38), SPEC)
                                             for m in sent.messages])
    assert result.vector is None
    assert result.outcome.update_refused == "the aggregated delta overflows float32"


def test_delta_fedavg_refuses_a_round_with_too_few_deltas_for_the_rule():
    deltas = np.array([[1e30] * 6, [1.0] * 6])  # the attacker and one honest client
    new, outcome = _round({"rule": "median"}, deltas)
    assert new is None and outcome.no_contribution
    reason = ("aggregation.rule='median' tolerates aggregation.tolerate=1 only with deltas this "
              "round >= 2 x tolerate + 1 = 3, got 2")
    assert outcome.update_refused == reason
    assert outcome.aggregation == {"rule": "median", "deltas": 2, "refused": reason}


def test_only_the_mean_takes_population_expansion_weights():
    sets = ["privacy.sample.enabled=false", "data.partition=iid", "train.clients_per_round=5",
            "data.domain_by=collection", "data.target_domain=set2", "data.num_clients=20",
            "data.target_clients=5"]
    expansion = [{"name": "population_expansion", "weighting": "fixed", "lam": 0.5}]
    cfg = load_config(None, [*sets, "aggregation.norm_bound=adaptive"])
    cfg.plugins = expansion
    cfg.validate()
    cfg = load_config(None, [*sets, "aggregation.rule=median"])
    cfg.plugins = expansion
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value) == (
        "aggregation.rule='median' does not compose with plugins[0].name="
        "'population_expansion', which weights clients; use aggregation.rule='mean' (with an "
        "aggregation.norm_bound)")


# -- attack simulation


def test_attack_simulation_flips_or_boosts_only_the_listed_partitions():
    delta = np.arange(4, dtype=np.float32)
    flip = AttackSimulationConfig(kind="flip", scale=10.0, partitions=[2])
    boost = AttackSimulationConfig(kind="boost", scale=100.0, partitions=[2])
    np.testing.assert_array_equal(attack(flip, 2, delta), -10 * delta)
    np.testing.assert_array_equal(attack(boost, 2, delta), 100 * delta)
    assert attack(flip, 1, delta) is delta
    assert attack(AttackSimulationConfig(), 2, delta) is delta
    assert attack(boost, 2, delta).dtype == np.float32


def test_attack_simulation_withhold_fails_only_the_listed_partitions_before_training():
    """kind "withhold" (benchmarks/robust.py's exclusion floor): the listed partition's
    client fails every round before training; the others, and the delta path, are as
    honest."""
    from clients.faults import InjectedCrash, withhold

    cfg = load_config(None, ["faults.attack_simulation.kind=withhold",
                             "faults.attack_simulation.partitions=[0]"]).faults.attack_simulation
    with pytest.raises(InjectedCrash, match="partition 0 withholds its delta in round 3"):
        withhold(cfg, 0, 3)
    withhold(cfg, 1, 3)
    withhold(AttackSimulationConfig(kind="flip", partitions=[0]), 0, 3)
    delta = np.arange(4, dtype=np.float32)
    assert attack(cfg, 0, delta) is delta


# -- config


def test_aggregation_config_loads():
    cfg = load_config(None, ["aggregation.rule=trimmed_mean", "aggregation.norm_bound=3",
                             "privacy.sample.enabled=false"])
    assert (cfg.aggregation.rule, cfg.aggregation.norm_bound) == ("trimmed_mean", 3.0)
    assert load_config(None).aggregation.default


@pytest.mark.parametrize(("sets", "needle"), [
    (["aggregation.rule=bulyan"], "aggregation.rule='bulyan' is not one of: mean, median"),
    (["aggregation.norm_bound=auto"], "aggregation.norm_bound='auto' must be a number > 0"),
    (["aggregation.norm_bound=0"], "aggregation.norm_bound must be > 0"),
    (["aggregation.norm_bound=-1.5"], "aggregation.norm_bound must be > 0"),
    (["aggregation.norm_bound=nan"], "aggregation.norm_bound must be a finite number"),
    (["aggregation.norm_bound=1e300"],
     "aggregation.norm_bound must be in [1e-12, 1e+06], got 1e+300"),
    (["aggregation.norm_bound=true"], "aggregation.norm_bound must be"),
    (["aggregation.adaptive_factor=0"], "aggregation.adaptive_factor must be in (0, 1000]"),
    (["aggregation.trim_beta=0.5"], "aggregation.trim_beta must be in [0, 0.5)"),
    # With the default tolerate=1 it cuts max(1, floor(0.5)) = 1; tolerating 0 it cuts none.
    (["aggregation.rule=trimmed_mean", "aggregation.trim_beta=0.1", "aggregation.tolerate=0"],
     "aggregation.trim_beta=0.1 with aggregation.tolerate=0 trims no delta from "
     "train.clients_per_round=5"),
    (["aggregation.rule=trimmed_mean", "aggregation.tolerate=3"],
     "aggregation.rule='trimmed_mean' cuts 3 per side (max(aggregation.tolerate=3, floor("
     "trim_beta=0.2 x 5))) and needs train.clients_per_round > 6, got 5"),
    (["aggregation.rule=median", "aggregation.tolerate=3"],
     "aggregation.rule='median' tolerates aggregation.tolerate=3 only with "
     "train.clients_per_round >= 2 x tolerate + 1 = 7, got 5"),
    (["aggregation.norm_bound=adaptive", "aggregation.tolerate=3"],
     "aggregation.norm_bound='adaptive' tolerates aggregation.tolerate=3 only with "
     "train.clients_per_round >= 2 x tolerate + 1 = 7, got 5"),
    (["aggregation.norm_bound_center=mean"],
     "aggregation.norm_bound_center='mean' is not one of: zero, median"),
    (["aggregation.norm_bound_center=median"],
     "aggregation.norm_bound_center='median' measures a norm bound: set aggregation."
     "norm_bound to 'adaptive' or a number"),
    (["aggregation.norm_bound=2", "aggregation.norm_bound_center=median",
      "aggregation.tolerate=3"],
     "aggregation.norm_bound_center='median' tolerates aggregation.tolerate=3 only with "
     "train.clients_per_round >= 2 x tolerate + 1 = 7, got 5"),
    (["aggregation.norm_bound_center=auto"],
     "aggregation.norm_bound_center='auto' measures a norm bound: set aggregation."
     "norm_bound to 'adaptive' or a number"),
    # At load "auto" needs the median's cohort whatever the privacy setting (the stricter).
    (["aggregation.norm_bound=2", "aggregation.norm_bound_center=auto",
      "aggregation.tolerate=3", "privacy.sample.enabled=false"],
     "aggregation.norm_bound_center='auto' tolerates aggregation.tolerate=3 only with "
     "train.clients_per_round >= 2 x tolerate + 1 = 7, got 5"),
    (["aggregation.norm_bound_direction=auto"],
     "aggregation.norm_bound_direction='auto' checks the rows of a norm bound"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=auto",
      "aggregation.rule=median"],
     "aggregation.norm_bound_direction='auto' drops rows from the mean: it needs "
     "aggregation.rule='mean', got 'median'"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=auto",
      "aggregation.tolerate=2", "privacy.sample.enabled=true"],
     "aggregation.norm_bound_direction='auto' tolerates aggregation.tolerate=2 only with "
     "train.clients_per_round >= 2 x tolerate + 2 = 6"),
    (["aggregation.norm_bound_direction=mean"],
     "aggregation.norm_bound_direction='mean' is not one of: off, median"),
    (["aggregation.norm_bound_direction=median"],
     "aggregation.norm_bound_direction='median' checks the rows of a norm bound: set "
     "aggregation.norm_bound to 'adaptive' or a number"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=median",
      "aggregation.rule=median"],
     "aggregation.norm_bound_direction='median' drops rows from the mean: it needs "
     "aggregation.rule='mean', got 'median'"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=median",
      "aggregation.tolerate=0"],
     "aggregation.norm_bound_direction='median' drops at most aggregation.tolerate rows: "
     "set aggregation.tolerate >= 1"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=median",
      "aggregation.direction_min_cosine=1"],
     "aggregation.direction_min_cosine must be in (-1, 1), got 1"),
    (["aggregation.direction_min_cosine=nan"],
     "aggregation.direction_min_cosine must be a finite number"),
    (["aggregation.norm_bound=1", "aggregation.norm_bound_direction=median",
      "aggregation.tolerate=3"],
     "aggregation.norm_bound_direction='median' tolerates aggregation.tolerate=3 only with "
     "train.clients_per_round >= 2 x tolerate + 2 = 8"),
    (["aggregation.tolerate=-1"], "aggregation.tolerate must be >= 0"),
    (["aggregation.rule=krum", "aggregation.krum_f=2"],
     "aggregation.krum_f=2 needs train.clients_per_round >= 2 x krum_f + 3 = 7, got 5"),
    (["aggregation.krum_f=-1"], "aggregation.krum_f must be >= 0"),
    (["aggregation.rule=multi_krum", "aggregation.multi_krum_m=5"],
     "aggregation.multi_krum_m=5 must be <= train.clients_per_round - aggregation.krum_f = 4"),
    (["privacy.user.enabled=true", "aggregation.rule=median"],
     "must stay 'mean' and 'off' with privacy.user.enabled=true"),
    (["privacy.user.enabled=true", "aggregation.norm_bound=adaptive"],
     "must stay 'mean' and 'off' with privacy.user.enabled=true"),
    (["faults.attack_simulation.kind=swap"], "faults.attack_simulation.kind='swap' is not one"),
    (["faults.attack_simulation.kind=flip"], "needs faults.attack_simulation.partitions"),
    (["faults.attack_simulation.kind=flip", "faults.attack_simulation.partitions=[20]"],
     "faults.attack_simulation.partitions[0]=20 must be in [0, data.num_clients=20)"),
    (["faults.attack_simulation.scale=0"], "faults.attack_simulation.scale must be in (0, 1e+09]"),
    (["aggregation.typo=1"], "unknown key aggregation.typo"),
])
def test_aggregation_config_refusals_are_one_line(sets, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert needle in str(err.value) and "\n" not in str(err.value)


# Moved here from tests/test_attackb_robust.py (a review's reproducers, assertions kept): Attack
# (class 5, poisoning): one client of five against each robust rule through the real

pytestmark = pytest.mark.usefixtures("task_identity")

HONEST = 1.0  # every honest client sends +-1 per coordinate
ATTACK = 1e30  # the attacker (partition 0), finite in float32


def _round_with_drops(settings: dict, answering: list[int]) -> np.ndarray | None:
    """A cohort of 5 (what the config was checked against); only `answering` partitions reply
    (the rest drop, as a crashed or slow honest node does). Partition 0 is the attacker."""
    cfg = load_config(None, [f"aggregation.{k}={v}" for k, v in settings.items()])
    assert cfg.train.clients_per_round == 5  # check_cohort passed for 5
    strategy = DeltaFedAvg(SPEC, 5, seed=0, aggregation=cfg.aggregation)
    strategy.roster = {i: 11 + i for i in range(5)}
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    sent = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    rng = np.random.default_rng(1)
    replies = []
    for pid in answering:
        delta = np.full(6, ATTACK) if pid == 0 else rng.choice([-HONEST, HONEST], 6)
        replies.append(reply(by_pid[pid], delta, SPEC, n=10))
    return strategy.aggregate_train(sent, replies).vector


@pytest.mark.parametrize(("settings", "answering"), [
    # beta=0.2 passes check_cohort(5) (floor(1.0) = 1), but 4 replies trim floor(0.8) = 0.
    ({"rule": "trimmed_mean", "trim_beta": 0.2}, [0, 1, 2, 3]),
    # m=4 passes check_cohort(5) (4 <= 5 - 1), but 4 replies select all 4: a plain mean.
    ({"rule": "multi_krum", "krum_f": 1, "multi_krum_m": 4}, [0, 1, 2, 3]),
    # Two replies: Krum's scores tie and the stable argsort picks partition 0, the attacker.
    ({"rule": "krum", "krum_f": 1}, [0, 3]),
    # Two replies: the median is the mean of the two.
    ({"rule": "median"}, [0, 2]),
])
def test_attackb_robust_rule_holds_when_honest_clients_drop(settings, answering):
    """One client of the configured five cannot move the model outside the honest range, with
    fewer replies than train.clients_per_round (or the round is refused)."""
    new = _round_with_drops(settings, answering)
    assert new is None or float(np.abs(new).max()) <= HONEST, (
        f"{settings} with replies from {answering}: the attacker moved a coordinate to "
        f"{float(np.abs(new).max()):.3g}")


def test_attackb_adaptive_norm_bound_holds_when_honest_clients_drop():
    """The adaptive bound is factor x an honest median norm, also with fewer replies than
    train.clients_per_round (else one attacker sets the bound it is clipped to)."""
    new = _round_with_drops({"rule": "mean", "norm_bound": "adaptive"}, [0, 1])
    norm = None if new is None else float(np.linalg.norm(new.astype(np.float64)))
    assert norm is None or norm <= HONEST * np.sqrt(6) * (1 + 1e-6), (
        f"adaptive bound with 2 replies: the aggregate has norm {norm:.3g}")


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_attackb_robust_rule_with_expansion_weights_is_refused(rule):
    """population_expansion's per-client weights (a source weight < 1, annealed to 0 with
    source clients then left out of the cohort) are ignored by the coordinate-wise/Krum rules
    and shrink the cohort below the checked size: the combination must be refused."""
    cfg = load_config(None, ["privacy.sample.enabled=false", "data.partition=iid",
                             "train.clients_per_round=5", "data.domain_by=collection",
                             "data.target_domain=set2", "data.num_clients=20",
                             "data.target_clients=5", f"aggregation.rule={rule}"])
    cfg.plugins = [{"name": "population_expansion", "weighting": "anneal", "lam": 0.8,
                    "anneal_rounds": 4}]
    with pytest.raises(ConfigError, match="aggregation"):
        cfg.validate()


def test_attackb_own_data_count_claim_does_not_buy_the_whole_norm_bound():
    """With mean + a fixed norm bound B, one node of five moves the aggregate by at most
    B / cohort, also when it claims the largest allowed own-data count at discovery (a
    client's claim must not set its own weight share)."""
    from fedtune.wire.protocol import MAX_NODE_EXAMPLES
    from strategies.discovery import Roster

    bound = 1.0
    strategy = DeltaFedAvg(
        SPEC, 5, seed=0,
        aggregation=load_config(None, [f"aggregation.norm_bound={bound}"]).aggregation)
    roster = Roster(nodes={i: 11 + i for i in range(5)},
                    own_examples={0: MAX_NODE_EXAMPLES})  # the attacker's claim
    strategy.adopt(roster, sizes=[100] * 5)
    cohort = strategy.sample(1, FakeGrid(list(strategy.roster.values())))
    sent = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    replies = [reply(by_pid[pid], np.full(6, ATTACK) if pid == 0 else np.zeros(6), SPEC,
                     n=MAX_NODE_EXAMPLES if pid == 0 else 100) for pid in sorted(by_pid)]
    new = strategy.aggregate_train(sent, replies).vector
    moved = float(np.linalg.norm(new.astype(np.float64)))
    assert moved <= bound / 5 * (1 + 1e-6), (
        f"one node's own-data count claim moved the aggregate by {moved:.4g} > B/5 = "
        f"{bound / 5}")


# --- review ATTACK27D: the direction check at the smallest cohort --------------------------

def _direction_cfg(**settings) -> AggregationConfig:
    cfg = AggregationConfig(**{"norm_bound": 1.5, "norm_bound_direction": "median",
                               **settings})
    cfg.validate()
    return cfg


def _iid_honest(n: int, noise: float, seed: int, d: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    step = rng.normal(size=d)
    step /= np.linalg.norm(step)
    return step, step + noise * rng.normal(size=(n, d)) / np.sqrt(d)


@pytest.mark.parametrize("f", [1, 2])
def test_direction_check_needs_an_honest_majority_among_every_rows_others(f):
    """At n = 2f + 1 the attackers are half of an honest row's n - 1 others and set its
    reference outside the honest range (review ATTACK27D: -1 on every coordinate moved all
    50 coordinates out); such a cohort is refused, and from 2f + 2 on the same attack leaves
    every honest row's reference inside the honest range."""
    cfg = _direction_cfg(norm_bound=100.0, tolerate=f)
    assert "2 x tolerate + 2" in cfg.shortfall(2 * f + 1, "deltas")
    n = 2 * f + 2
    assert cfg.shortfall(n, "deltas") is None
    _, honest = _iid_honest(n - f, 0.3, 0)
    rows = np.vstack([honest, np.tile(-np.ones(50), (f, 1))])
    bounded, _ = robust.clip_rows(rows, 100.0)
    refs = robust.median_of_others(bounded)
    low, high = bounded[:n - f].min(0), bounded[:n - f].max(0)
    assert ((refs[:n - f] >= low) & (refs[:n - f] <= high)).all()


def test_one_attacker_of_three_is_refused_not_let_reverse_the_round():
    """ATTACK27D: one of three, -(h_b + eps h_a), got an honest row dropped and kept its own
    reversed row (the global moved -0.246 along the honest step where the bound alone allows
    no less than +0.158). A cohort of three no longer runs the check: refused at load and,
    when clients drop to three, in the round (no update)."""
    with pytest.raises(ConfigError, match=r"2 x tolerate \+ 2 = 4"):
        load_config(None, ["data.num_clients=3", "train.clients_per_round=3",
                           "aggregation.norm_bound=1.5",
                           "aggregation.norm_bound_direction=median"])
    _, h = _iid_honest(2, 0.3, 0)
    attacker = -(h[1] + 0.5 * h[0])
    out = robust.aggregate(np.vstack([h, attacker / np.linalg.norm(attacker) * 1.5]),
                           np.ones(3), _direction_cfg())
    assert out.delta is None and "2 x tolerate + 2" in out.figures["refused"]


@pytest.mark.parametrize("bound", [1.5, "adaptive"])
@pytest.mark.parametrize("noise", [0.3, 1.0, 2.0])
def test_one_attacker_of_four_moves_the_round_no_further_back_than_the_bound_allows(
        bound, noise):
    """With n = 2f + 2 the attack family of ATTACK27D (-(h_a + eps h_b) at or above the
    bound, every pair and eps) moves the global along the honest step no further back than
    the worst row the norm bound alone lets one client of four send."""
    cfg, plain = _direction_cfg(norm_bound=bound), AggregationConfig(norm_bound=bound)
    plain.validate()
    for seed in range(3):
        step, h = _iid_honest(3, noise, seed)
        worst_plain = min(
            float(robust.aggregate(np.vstack([h, -row / np.linalg.norm(row) * size]),
                                   np.ones(4), plain).delta @ step)
            for row in (step, *h) for size in (1.5, 10.0))
        for a, b in ((0, 1), (1, 2), (2, 0), (1, 0)):
            for eps in np.linspace(-3, 3, 25):
                row = -(h[a] + eps * h[b])
                for size in (1.5, 2.0):
                    rows = np.vstack([h, row / np.linalg.norm(row) * size])
                    moved = float(robust.aggregate(rows, np.ones(4), cfg).delta @ step)
                    assert moved >= worst_plain - 1e-9, (seed, a, b, eps, size)


def test_a_direction_check_that_can_drop_nothing_is_refused():
    """direction_min_cosine = -1 drops nothing (no cosine is below it), as tolerate = 0
    would: refused (ATTACK27D)."""
    with pytest.raises(ConfigError, match=r"direction_min_cosine must be in \(-1, 1\)"):
        _direction_cfg(direction_min_cosine=-1.0)

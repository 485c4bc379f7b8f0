"""ATTACK30: one hostile client of a configured cohort of 5 (tolerate 1, a fixed norm bound B)
moves the model by the whole B in one round, where docs/strategies.md and the config comment
state "one row moves the model by at most B / (cohort - tolerate)" = B / 4 (THREATS.md class 5).

`strategies.trust_weighting.share_cap` takes n from the rows that reached the aggregate (those
with a positive server weight), not the cohort the server configured, and with a fixed bound
nothing refuses a small round (`AggregationConfig.shortfall` floors the adaptive bound and the
median centre only): as n falls to tolerate + 1 the cap rises to 1 and the ATTACK27H attack (a
targeted change at a tiny positive cosine carrying a round whose other rows score <= 0) is
back whole. The cohort shrinks with nobody failing: `population_expansion` stops asking source
clients once their weight reaches 0 (`anneal` after `anneal_rounds`, or `fixed` with lam 0),
so a round of 5 sampled keeps its target clients only, often 1 or 2; and whenever honest
clients drop or are rejected."""

import numpy as np
import pytest
from wire import reply, spec_of

from fedtune.config import load_config
from strategies import DeltaFedAvg
from strategies.delta_fedavg import RoundHooks
from strategies.plugins import build_plugins

pytestmark = pytest.mark.usefixtures("task_identity")

D = 40
BOUND = 1.0
COHORT, TOLERATE = 5, 1
# A configuration the docs cover: the trust weighting after a fixed bound, a cohort of 5,
# population expansion annealing its source clients out after round 4 (targets: ids 0-4).
SETS = ["privacy.sample.enabled=false", "data.partition=iid", "data.domain_by=collection",
        "data.target_domain=set2", "data.num_clients=20", "data.target_clients=5",
        "train.rounds=6", f"train.clients_per_round={COHORT}", "data.validation_fraction=0.1",
        f"aggregation.norm_bound={BOUND}", "aggregation.norm_bound_direction=validation",
        "aggregation.direction_weighting=cosine", f"aggregation.tolerate={TOLERATE}"]
EXPANSION = {"name": "population_expansion", "weighting": "anneal", "lam": 0.8,
             "anneal_rounds": 4}


def _vectors(seed: int = 0):
    """The server's direction (first half of the coordinates), the attacker's target (the
    second half: exactly orthogonal to it), the attacker's row (5 x the bound along the
    target plus 1e-12 of the server's direction) and an honest row at cosine -0.06."""
    rng = np.random.default_rng(seed)
    reference = np.concatenate([rng.normal(size=D // 2), np.zeros(D - D // 2)])
    unit = reference / np.linalg.norm(reference)
    target = np.concatenate([np.zeros(D // 2), rng.normal(size=D - D // 2)])
    target /= np.linalg.norm(target)
    attacker = 5 * BOUND * target + 1e-12 * unit
    side = np.concatenate([np.zeros(D // 2), rng.normal(size=D - D // 2)])
    side -= (side @ target) * target
    side /= np.linalg.norm(side)
    honest = BOUND * (-0.06 * unit + np.sqrt(1 - 0.06 ** 2) * side)
    return reference, target, attacker, honest


def _strategy(cfg, hooks: RoundHooks, reference):
    strategy = DeltaFedAvg(spec_of(D), cfg.train.clients_per_round, seed=0, hooks=hooks,
                           aggregation=cfg.aggregation.for_sample_dp(False),
                           reference=lambda vector: reference)
    strategy.roster = {pid: 100 + pid for pid in range(cfg.data.num_clients)}
    return strategy


def _play(strategy, server_round: int, cohort: list[int], rows: dict[int, np.ndarray]):
    start = np.zeros(D, dtype=np.float32)
    sent = strategy.configure_train(server_round, start, 0.1, cohort)
    by_pid = {sent.asked[m.metadata.dst_node_id]: m for m in sent.messages}
    result = strategy.aggregate_train(
        sent, [reply(by_pid[pid], rows[pid], strategy.spec) for pid in rows])
    return start, result


def _assert_within_the_stated_bound(start, result, target):
    if result.vector is None:  # the round refused: the attacker moved nothing
        return
    bound = result.outcome.aggregation["norm_bound"]["bound"]
    along = float((result.vector.astype(np.float64) - start) @ target) / bound
    weighted = result.outcome.aggregation["norm_bound"]["direction"]
    assert along <= 1 / (COHORT - TOLERATE) + 1e-6, (
        f"the attacker moved the model by {along:.4f} B along its target in one round, over "
        f"the stated B / (cohort - tolerate) = {1 / (COHORT - TOLERATE):.2f} B (share_cap "
        f"{weighted['share_cap']}, shares {weighted['shares']}, rows "
        f"{result.outcome.aggregation['deltas']})")


@pytest.mark.parametrize("drawn,kept", [([1, 3, 6, 9, 12], [1, 3]), ([1, 6, 9, 12, 15], [1])])
def test_population_expansion_shrinks_the_round_and_lifts_the_cap(drawn, kept):
    """Hostile target client 1 of 5, after the anneal (class 5: B / (cohort - tolerate))."""
    cfg = load_config(None, SETS)
    cfg.plugins = [EXPANSION]
    cfg.validate()  # the config check passes: clients_per_round = 5 >= what tolerate needs
    (plugin,) = build_plugins(cfg)
    reference, target, attacker, honest = _vectors()
    hooks = RoundHooks(select_cohort=plugin.select_cohort, client_weight=plugin.client_weight)
    strategy = _strategy(cfg, hooks, reference)
    cohort = strategy.select(5, drawn)  # round 5: the source weight is 0, sources not asked
    assert cohort == kept  # the setting of the case: nobody failed, the plugin chose
    rows = {1: attacker, **{pid: honest for pid in kept if pid != 1}}
    start, result = _play(strategy, 5, cohort, rows)
    _assert_within_the_stated_bound(start, result, target)


@pytest.mark.parametrize("bound,replied", [(f"{BOUND}", 2), ("adaptive", 3)])
def test_honest_clients_that_drop_lift_the_cap(bound, replied):
    """Hostile client 0 of 5 whose round lost honest replies (class 5: B / (cohort - tolerate))."""
    # No plugin. The adaptive bound refuses a round under 2 x tolerate + 1 = 3 rows
    # (`shortfall`), but at 3 the cap is 1 / (3 - 1): twice the stated share.
    cfg = load_config(None, [*SETS, f"aggregation.norm_bound={bound}"])
    reference, target, attacker, honest = _vectors(1)
    strategy = _strategy(cfg, RoundHooks(), reference)
    # The partitions from `replied` on time out or are rejected; 0 (hostile) and the
    # honest ones before `replied` reply.
    rows = {0: attacker, **{pid: honest for pid in range(1, replied)}}
    start, result = _play(strategy, 1, [0, 1, 2, 3, 4], rows)
    _assert_within_the_stated_bound(start, result, target)

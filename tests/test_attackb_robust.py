"""Attack (class 5, poisoning): one client of five against each robust rule through the real
DeltaFedAvg round, when the cohort that actually aggregates is smaller than the configured
train.clients_per_round (a dropped/failed/timed-out honest client, or a plugin shrinking the
cohort). `AggregationConfig.check_cohort` only checks the configured cohort; the rules are run
on whatever arrives."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from wire import reply

from fedtune.config import ConfigError, load_config
from fedtune.wire.delta import DeltaSpec
from strategies import DeltaFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})
HONEST = 1.0  # every honest client sends +-1 per coordinate
ATTACK = 1e30  # the attacker (partition 0), finite in float32


def _round(settings: dict, answering: list[int]) -> np.ndarray | None:
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
    new = _round(settings, answering)
    assert new is None or float(np.abs(new).max()) <= HONEST, (
        f"{settings} with replies from {answering}: the attacker moved a coordinate to "
        f"{float(np.abs(new).max()):.3g}")


def test_attackb_adaptive_norm_bound_holds_when_honest_clients_drop():
    """The adaptive bound is factor x an honest median norm, also with fewer replies than
    train.clients_per_round (else one attacker sets the bound it is clipped to)."""
    new = _round({"rule": "mean", "norm_bound": "adaptive"}, [0, 1])
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

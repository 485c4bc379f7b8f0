"""Population expansion: two-domain partitions, the plugin's weights and schedule, weights
applied after user-level clipping, and the importance-weighted loss."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from wire import reply, spec_of

from clients.plugins.expansion import DomainWeighting
from fedtune.config import ConfigError, UserDPConfig, load_config
from fedtune.data import PartitionError, load_corpus, partition_domains
from fedtune.tuning.base import ClassificationHead
from fedtune.wire.protocol import DomainSettings, TrainInstruction, TrainReport
from strategies import DeltaFedAvg
from strategies.delta_fedavg import RoundHooks
from strategies.pipeline import ClientReport
from strategies.plugins import build_plugins
from strategies.user_dp import UserLevelDP

DOMAINS = ["privacy.sample.enabled=false", "data.partition=iid", "train.clients_per_round=2",
           "data.domain_by=collection", "data.target_domain=set2"]


def _cfg(*extra, plugin=None):
    cfg = load_config(None, [*DOMAINS, *extra])
    if plugin is not None:
        cfg.plugins = [plugin]
        cfg.validate()
    return cfg


def test_target_clients_come_first_and_hold_only_target_rows():
    cfg = _cfg("data.num_clients=12", "data.target_clients=4")
    train = load_corpus("spamassassin")["train"]
    parts = partition_domains(train, cfg.data, seed=0)
    collection = np.asarray(train["collection"])
    assert len(parts) == 12
    assert all((collection[p] == "set2").all() for p in parts[:4])
    assert all((collection[p] == "set1").all() for p in parts[4:])
    everything = np.concatenate(parts)
    assert len(everything) == len(train) == len(np.unique(everything))
    # The target population is the one a target-only run gets.
    alone = partition_domains(train, _cfg("data.num_clients=4", "data.target_clients=4").data, 0)
    for a, b in zip(alone, parts[:4], strict=True):
        np.testing.assert_array_equal(a, b)


def test_domain_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.target_clients must be in"):
        _cfg("data.num_clients=4", "data.target_clients=5")
    with pytest.raises(ConfigError, match="need data.domain_by"):
        load_config(None, ["data.target_clients=3"])
    cfg = _cfg("data.num_clients=4", "data.target_clients=2", "data.target_domain=set9")
    with pytest.raises(PartitionError, match="'set9' matches no row.*set1"):
        partition_domains(load_corpus("spamassassin")["train"], cfg.data, 0)


@pytest.mark.parametrize("table,extra,message", [
    ({"weighting": "magic"}, (), "weighting='magic' is not one of"),
    ({"lam": 1.5}, (), r"lam must be in \[0, 1\]"),
    ({"weighting": "importance"}, (), "set tuning.domain_head = true"),
    ({}, ("data.target_clients=20",), "needs a source population"),
    ({"weighting": "importance"}, ("tuning.domain_head=true", "split.enabled=true"),
     "with split.enabled use 'fixed' or 'anneal'"),
])
def test_bad_expansion_params_are_named(table, extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("data.num_clients=20", "data.target_clients=5", *extra,
             plugin={"name": "population_expansion", **table})


def test_anneal_weights_fall_to_zero_and_then_source_clients_are_not_asked():
    cfg = _cfg("data.num_clients=20", "data.target_clients=5", "train.rounds=5",
               plugin={"name": "population_expansion", "weighting": "anneal", "lam": 0.8,
                       "anneal_rounds": 4})
    (plugin,) = build_plugins(cfg)
    assert [plugin.client_weight(r, 7) for r in (1, 3, 5)] == pytest.approx([0.8, 0.4, 0.0])
    assert plugin.client_weight(5, 2) == 1.0
    assert plugin.select_cohort(4, [1, 6, 9]) == [1, 6, 9]
    assert plugin.select_cohort(5, [1, 6, 9]) == [1]
    clients = [ClientReport(1, TrainReport(steps=1)),
               ClientReport(6, TrainReport(steps=1, extras={"importance-weight": 2.5}))]
    extras = plugin.round_extras(3, clients)["expansion"]
    assert extras["source_importance_weight_mean"] == 2.5  # the source client's, typed
    assert extras["source_weight"] == pytest.approx(0.4)
    assert (extras["target_clients"], extras["source_clients"]) == (1, 1)


def test_importance_weighting_tells_each_client_its_domain():
    cfg = _cfg("data.num_clients=20", "data.target_clients=5", "tuning.domain_head=true",
               plugin={"name": "population_expansion", "weighting": "importance",
                       "max_weight": 3.0})
    (plugin,) = build_plugins(cfg)
    assert plugin.client_config(1, 4) == {"domain": DomainSettings(True, 3.0)}
    assert plugin.client_config(1, 5) == {"domain": DomainSettings(False, 3.0)}
    # Through the wire and into the client's loss weighting.
    spec = _spec(2)
    order = TrainInstruction(np.zeros(2, np.float32), 1, 0.1, spec.hash,
                             **plugin.client_config(1, 5))
    received = TrainInstruction.from_record(order.to_record(), spec)
    assert DomainWeighting.from_settings(received.domain) == DomainWeighting(False, 3.0)


def _spec(size):
    return spec_of(size)


@pytest.mark.usefixtures("task_identity")
def test_user_dp_weights_apply_after_clipping():
    spec = _spec(4)
    strategy = DeltaFedAvg(spec, 2, seed=0, hooks=RoundHooks(
        client_weight=lambda rnd, pid: 0.5 if pid == 1 else 1.0))
    strategy.roster = {0: 100, 1: 101}
    rounds = UserLevelDP(strategy, UserDPConfig(enabled=True, clip_norm=1.0), 0.0, 2)
    base = np.zeros(4, np.float32)
    sent = rounds.configure_train(1, base, 0.1, rounds.sample(1, FakeGrid([])))
    deltas = [np.array([0.3, 0, 0, 0]), np.array([0, 8.0, 0, 0])]
    result = rounds.aggregate_train(sent, [reply(m, d, spec) for m, d in
                                           zip(sent.messages, deltas, strict=True)])
    # Source delta clipped to norm 1, then halved: it adds 0.5, not 4 or 1.
    np.testing.assert_allclose(result.vector, [0.3 / 2, 0.5 / 2, 0, 0], rtol=1e-6)
    assert max(result.outcome.aggregated_norms) <= 1.0
    assert [c["weight"] for c in result.outcome.accepted] == [1.0, 0.5]


@pytest.mark.usefixtures("task_identity")
def test_fedavg_weights_multiply_the_example_counts():
    spec = _spec(2)
    strategy = DeltaFedAvg(spec, 2, seed=0, hooks=RoundHooks(
        client_weight=lambda rnd, pid: 0.0 if pid == 1 else 1.0))
    strategy.roster = {0: 100, 1: 101}
    sent = strategy.configure_train(1, np.zeros(2, np.float32), 0.1, [0, 1])
    new = strategy.aggregate_train(sent, [reply(m, d, spec) for m, d in
                                          zip(sent.messages, [[1.0, 0], [0, 5.0]],
                                              strict=True)]).vector
    np.testing.assert_allclose(new, [1.0, 0.0])


def test_source_examples_weigh_by_the_domain_odds_clipped():
    head = ClassificationHead(4, 2, domain=True)
    with torch.no_grad():
        head.domain.weight.copy_(torch.tensor([[3.0, 0, 0, 0]]))
    pooled = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    logits = head(pooled)
    labels = torch.tensor([0, 1])
    model = torch.nn.Module()
    model.head = head
    odds = head.last_domain_logit.detach().exp()
    _, mean_source = DomainWeighting(False, 2.0).loss(model, logits, labels)
    assert mean_source == pytest.approx(float(odds.clamp(max=2.0).mean()))
    loss, mean_target = DomainWeighting(True, 2.0).loss(model, logits, labels)
    assert mean_target == 1.0
    loss.backward()
    # The domain loss trains the domain layer, and never the pooled features.
    assert head.domain.weight.grad.abs().sum() > 0

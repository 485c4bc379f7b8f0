"""Strategy plugins: registry and config errors, and EL2N pruning's scoring and selection."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch.utils.data import TensorDataset

from clients.plugins import el2n as pruning
from fedtune.config import ConfigError, load_config
from fedtune.wire.protocol import PruneSettings
from strategies.plugins import available_plugins, build_plugins

NO_SAMPLE_DP = "privacy.sample.enabled=false"


def _cfg(*plugin_tables, extra=(NO_SAMPLE_DP,)):
    cfg = load_config(None, list(extra))
    cfg.plugins = [dict(t) for t in plugin_tables]
    cfg.validate()
    return cfg


def test_registry_names_el2n_and_unknown_names_list_it():
    assert "el2n_pruning" in available_plugins()
    with pytest.raises(ConfigError, match=r"plugins\[0\].name='nope' is not one of: "
                                          r".*el2n_pruning"):
        _cfg({"name": "nope"})


@pytest.mark.parametrize("table,message", [
    ({"name": "el2n_pruning"}, r"plugins\[0\].keep is required"),
    ({"name": "el2n_pruning", "keep": 1.5}, r"plugins\[0\].keep must be in \(0, 1\]"),
    ({"name": "el2n_pruning", "keep": "half"}, r"plugins\[0\].keep must be float"),
    ({"name": "el2n_pruning", "keep": 0.5, "colour": 1}, r"unknown params \['colour'\]"),
    ({"name": "el2n_pruning", "keep": 0.5, "every": -1}, r"every must be >= 0"),
])
def test_bad_plugin_params_are_named(table, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(table)


def test_pruning_with_sample_dp_needs_an_explicit_caveat():
    table = {"name": "el2n_pruning", "keep": 0.5}
    with pytest.raises(ConfigError, match="does not cover that selection"):
        _cfg(table, extra=())
    cfg = _cfg({**table, "allow_with_sample_dp": True}, extra=())
    (plugin,) = build_plugins(cfg)
    extras = plugin.round_extras(1, [])
    assert "does not cover" in extras["privacy_caveats"][0]
    assert plugin.client_config(1, 0) == {"prune": PruneSettings(keep=0.5, every=0)}


def test_plugins_load_from_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[privacy.sample]\nenabled = false\n[[plugins]]\nname = "el2n_pruning"\n'
                    'keep = 0.7\nevery = 2\n')
    cfg = load_config(path)
    assert cfg.plugins == [{"name": "el2n_pruning", "keep": 0.7, "every": 2}]


class FixedLogits(torch.nn.Module):
    method = "fixed"

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids, mask):
        return self.logits[ids[:, 0]]


def test_el2n_is_the_softmax_error_norm_and_keeps_the_hardest():
    logits = torch.tensor([[4.0, -4.0], [0.0, 0.0], [-3.0, 3.0], [2.0, -2.0]])
    labels = torch.tensor([0, 1, 0, 1])
    ids = torch.arange(4).unsqueeze(1)
    data = TensorDataset(ids, torch.ones_like(ids), labels)
    scores = pruning.el2n_scores(FixedLogits(logits), data)
    probs = torch.softmax(logits, -1)
    expected = torch.linalg.vector_norm(probs - torch.nn.functional.one_hot(labels, 2), dim=-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)
    assert pruning.keep_top(scores, 0.5).tolist() == [2, 3]  # the two misclassified
    assert pruning.keep_top(np.zeros(5), 0.5).tolist() == [0, 1, 2]  # ceil, ties by index


def test_selection_is_cached_until_the_rescore_interval(monkeypatch):
    calls = []

    def fake_scores(model, data):
        calls.append(1)
        return np.arange(len(data), dtype=float)[::-1] if len(calls) == 1 else \
            np.arange(len(data), dtype=float)

    class Scorer:  # stands in for a model or a split pipeline: scores are faked above
        module = torch.nn.Linear(1, 1)

        def client_flops(self, data):
            return 10.0 * len(data)

    monkeypatch.setattr(pruning, "el2n_scores", fake_scores)
    scorer = Scorer()
    ids = torch.arange(10).unsqueeze(1)
    data = TensorDataset(ids, torch.ones_like(ids), torch.zeros(10, dtype=torch.long))
    context = SimpleNamespace(state=RecordDict())
    config = PruneSettings(keep=0.3, every=2)
    first = pruning.select(scorer, data, config, context, 1)
    assert first.rescored and first.indices.tolist() == [0, 1, 2]
    assert first.scoring_flops == 100.0
    cached = pruning.select(scorer, data, config, context, 2)
    assert not cached.rescored and cached.indices.tolist() == [0, 1, 2]
    again = pruning.select(scorer, data, config, context, 3)
    assert again.rescored and again.indices.tolist() == [7, 8, 9]


@pytest.mark.parametrize("keep,every", [(0.3, 2), (0.5, 0), (0.97, 1), (1.0, 2)])
def test_a_pruning_client_trains_on_exactly_the_count_the_server_charges(keep, every):
    """The server charges an el2n client the DP-SGD release of `trained_sizes(n)` every
    round (strategies.release_plan); the client trains on its selection, made before it
    trains, at its first participation too. ATTACK29G: the server charged all n in the
    first round (it believed the client trained on all n before its first scoring), which
    under-counted a client that trains on its kept share every round."""
    cfg = load_config(None, ["privacy.sample.enabled=false"])
    cfg.plugins.append({"name": "el2n_pruning", "keep": keep, "every": every})
    plugin = build_plugins(cfg)[0]
    for n in (1, 7, 40, 333):
        ids = torch.arange(n).unsqueeze(1)
        data = TensorDataset(ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long))
        scorer = SimpleNamespace(module=torch.nn.Linear(1, 1), client_flops=lambda d: 0.0,
                                 logits=lambda ids, mask: torch.randn(len(ids), 2))
        context = SimpleNamespace(state=RecordDict())
        for rnd in (1, 2, 3, 5, 8):  # rounds the client is sampled in
            settings = plugin.client_config(rnd, 0)["prune"]  # sent every round
            selection = pruning.select(scorer, data, settings, context, rnd)
            assert plugin.trained_sizes(n) == [len(selection.indices)], (n, rnd)

"""ATTACK29H: `ReleasePlan.releases` maps a client's count through each plugin's size hook in
turn (ATTACK29G), so two `[[plugins]]` tables of el2n_pruning (the config accepted them) were
charged as if the client pruned twice: ceil(k2 x ceil(k1 x n)) examples. The client prunes
once: the instruction carries one `prune` setting (`strategies.server._plugin_settings`: the
last table's wins), and it trains on ceil(k2 x n). The two counts are different mechanisms
(rate, steps, and under calibrated noise sigma): the one charged sat below the one released
(calibrated: 1.63 against 1.92 by PLD; given noise 0.6: 8.60 against 10.49). A plugin named
twice is now refused when the config is validated, in one line naming both tables; the
charge of the one table a run may hold is what its client trains on
(tests/test_plugins.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from independent_accountant import pld_epsilon
from torch.utils.data import TensorDataset

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from clients.plugins import el2n as pruning
from fedtune.config import ConfigError, load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.plugins.base import build_plugins
from strategies.privacy_ledger import PrivacyLedger
from strategies.server import _plugin_settings

ROUNDS, TARGET, DELTA = 5, 4.0, 1e-5


def _sets(batch: int, sigma: float, epochs: float) -> list[str]:
    return ["data.num_clients=2", "train.clients_per_round=1", f"train.batch_size={batch}",
            "privacy.sample.accountant=rdp", f"privacy.sample.delta={DELTA}",
            f"privacy.sample.noise_multiplier={sigma}",
            f"privacy.sample.target_epsilon={TARGET if sigma == 0 else 50.0}",
            f"train.rounds={ROUNDS}", f"train.local_epochs={epochs}"]


def _pld(entries) -> float:
    return pld_epsilon(entries, DELTA)


# (examples, batch, noise multiplier (0: calibrated), local epochs): charged ceil(0.5 x
# ceil(0.3 n)) examples, trained on ceil(0.5 n).
CASES = [(50, 8, 0.0, 0.5),  # calibrated: 8 charged (q 1, 1 step), 25 trained (q 1/4, 2)
         (20, 4, 0.6, 1.0)]  # given noise: 3 charged (q 1, 1 step), 10 trained (q 1/3, 3)


@pytest.mark.parametrize("N,B,sigma,epochs", CASES)
def test_two_pruning_tables_are_charged_the_count_the_client_trains_on(N, B, sigma, epochs):
    """Adversary: whoever sees a pruning client's uploads (the server included); invariant:
    THREATS 2 (a client's reported epsilon is never below the accountant's value for the
    releases it actually made)."""
    cfg = load_config(None, _sets(B, sigma, epochs))
    cfg.plugins = [{"name": "el2n_pruning", "keep": 0.3, "allow_with_sample_dp": True},
                   {"name": "el2n_pruning", "keep": 0.5, "allow_with_sample_dp": True}]
    with pytest.raises(ConfigError) as refused:
        cfg.validate()
    text = str(refused.value)
    assert "\n" not in text and "plugins[1].name='el2n_pruning' repeats plugins[0]" in text
    # The instruction's one setting (what a client of such a run would have trained on)
    # against the server's chained plan: the two part ways, which is why it is refused.
    plugins = build_plugins(cfg)
    settings = _plugin_settings(1, 0, plugins)["prune"]
    ids = torch.arange(N).unsqueeze(1)
    data = TensorDataset(ids, torch.ones_like(ids), torch.zeros(N, dtype=torch.long))
    scorer = SimpleNamespace(module=torch.nn.Linear(1, 1), client_flops=lambda d: 0.0,
                             logits=lambda ids, mask: torch.randn(len(ids), 2))
    trained = len(pruning.select(scorer, data, settings, SimpleNamespace(state=RecordDict()),
                                 1).indices)
    assert trained == math.ceil(0.5 * N)
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [N, N], ServerState(
        round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={}))
    ledger.releases.size_hooks += [p.trained_sizes for p in plugins]
    charged = ledger.releases.releases(N)
    released = PrivacyPlan.of(cfg).release(trained)
    assert charged != [released]
    assert _pld(charged) < _pld([released])  # what a run of it would have under-reported

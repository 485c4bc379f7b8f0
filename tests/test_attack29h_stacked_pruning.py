"""ATTACK29H: `ReleasePlan.releases` maps a client's count through each plugin's size hook in
turn (ATTACK29G), so two `[[plugins]]` tables of el2n_pruning (the config accepts them) are
charged as if the client pruned twice: ceil(k2 x ceil(k1 x n)) examples. The client prunes
once: the instruction carries one `prune` setting (`strategies.server._plugin_settings`: the
last table's wins), and it trains on ceil(k2 x n). The two counts are different mechanisms
(rate, steps, and under calibrated noise sigma); epsilon at one delta does not order them, and
the one charged can sit well below the one released, under calibrated and given noise alike.
The released bound under a secret cohort composes the same wrong count."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from flwr.app import RecordDict
from torch.utils.data import TensorDataset

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from clients.plugins import el2n as pruning
from fedtune.config import load_config
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
    acc = PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in entries:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                    int(steps))
    return acc.get_epsilon(DELTA)


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
    cfg.validate()  # accepted: nothing refuses a plugin named twice
    plugins = build_plugins(cfg)
    # What the client trains on: its selection under the instruction's one prune setting.
    ids = torch.arange(N).unsqueeze(1)
    data = TensorDataset(ids, torch.ones_like(ids), torch.zeros(N, dtype=torch.long))
    scorer = SimpleNamespace(module=torch.nn.Linear(1, 1), client_flops=lambda d: 0.0,
                             logits=lambda ids, mask: torch.randn(len(ids), 2))
    settings = _plugin_settings(1, 0, plugins)["prune"]
    trained = len(pruning.select(scorer, data, settings, SimpleNamespace(state=RecordDict()),
                                 1).indices)
    assert trained == math.ceil(0.5 * N)
    released = PrivacyPlan.of(cfg).release(trained)  # clients.train: planned_release(cfg, n)

    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [N, N], state)
    ledger.releases.size_hooks += [p.trained_sizes for p in plugins]  # as strategies.server
    assert ledger.use_example_counts({0: N, 1: N}) == {}
    assert ledger.stop(1, [0]) is None
    ledger.charge_sent(1, [0])
    ledger.settle(1)
    real = _pld([released])  # one round of what client 0 really trained on
    assert state.client_eps[0] >= real, (
        f"client 0 trained one round on {trained} examples {released} (independent PLD "
        f"epsilon {real:.4f}) but is charged {state.client_eps[0]:.4f} for "
        f"{state.client_dp[0].entries}")

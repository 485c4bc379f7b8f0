"""ATTACK29F: the operator's plan check (`check_planned_steps`, `fedtune run`'s preflight)
and the discovery's check of the partitions' own plans (`PrivacyLedger.use_example_counts`,
`ClaimAdmission.refusal` -> `ReleasePlan.every_round`) count a pruning plugin's releases
differently.

Without a secret cohort the preflight counts one example count a round (the costliest size is
what the ledger charges: the run's rounds end with no steps-bound stop), but discovery plans
every size the plugin allows, every round. A plan the preflight admits (6 rounds x 50 steps =
300 <= PRV's 500) then ends the run with a ConfigError at discovery ("600 steps, at most
500"), after Ray and the model have started; a node's claim at the same sizes is refused
for a plan the server would never charge."""

import numpy as np
import pytest
from ledger_rounds import first_stop

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from fedtune.config import ConfigError, load_config
from fedtune.config.accountant_steps import check_planned_steps, planned_steps
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.plugins.base import build_plugins
from strategies.privacy_ledger import PrivacyLedger

SIZES = [64, 48]
BASE = ["data.num_clients=2", "train.clients_per_round=2", "train.batch_size=16",
        "privacy.sample.noise_multiplier=3.0", "privacy.sample.target_epsilon=1000",
        "privacy.sample.accountant=prv", "train.rounds=6", "train.local_steps=50"]
PRUNING = {"name": "el2n_pruning", "keep": 0.5, "allow_with_sample_dp": True}


def _config():
    cfg = load_config(None, BASE)
    cfg.plugins.append(dict(PRUNING))
    return cfg


def _ledger(cfg):
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    ledger.releases.size_hooks += [plugin.trained_sizes for plugin in build_plugins(cfg)]
    return ledger, state


def test_a_pruning_plan_the_preflight_admits_is_not_refused_at_discovery():
    """Adversary: none (an honest operator); invariant: THREATS 8 (a plan is refused before
    start-up in one line, or it runs) and 2 (the plan check counts what the ledger charges)."""
    cfg = _config()
    check_planned_steps(cfg)  # the preflight admits it ...
    assert planned_steps(cfg)[0] == 300
    ledger, state = _ledger(cfg)
    # ... and the run needs no stop:
    assert first_stop(ledger, state, cfg.train.rounds, [0, 1]) is None
    ledger, _ = _ledger(cfg)
    try:
        refused = ledger.use_example_counts(dict(enumerate(SIZES)))
    except ConfigError as exc:  # after start-up: Ray, the model and the workers are up
        pytest.fail(f"the preflight admitted the plan ({planned_steps(cfg)[1]}), but the "
                    f"server's discovery refuses the partitions' own sizes: {exc}")
    assert refused == {}

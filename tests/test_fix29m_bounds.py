"""FIX29M: each accountant's bound on a history's steps, checked before any accountant call
(a node's claim at the wire's bound planned 1.25 M PRV steps: over 20 GB), and where an
operator's plan past it is refused: at config time (fixed steps) or at discovery (by epochs),
naming the keys."""

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.config.accountant_steps import check_planned_steps
from fedtune.privacy.accounting import calibrate_noise, check_history, max_steps
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from fedtune.run.preflight import preflight
from strategies.privacy_ledger import PrivacyLedger


def test_each_accountant_has_its_own_steps_bound_checked_before_any_call():
    assert max_steps("prv") < max_steps("rdp")
    at_bound = [(2.5, 0.01, max_steps("prv"))]
    check_history(at_bound, "prv")  # within: no error
    with pytest.raises(ValueError, match=r"at most 500 \(prv accountant\)"):
        check_history([(2.5, 0.01, max_steps("prv") + 1)], "prv")
    check_history([(2.5, 0.01, max_steps("prv") + 1)], "rdp")  # RDP takes far more
    # The calibration's search accounts all its steps at every try: refused first, at once.
    with pytest.raises(ValueError, match="takes at most 500"):
        calibrate_noise(8.0, 1e-5, 3.2e-6, 1_250_000, "prv")


def test_a_fixed_steps_plan_past_the_accountants_bound_is_refused_at_config_time():
    sets = ["train.rounds=60", "train.local_steps=10", "privacy.sample.accountant=prv"]
    with pytest.raises(ConfigError) as refused:
        check_planned_steps(load_config(None, sets))
    text = str(refused.value)
    assert "\n" not in text
    for key in ("train.rounds=60", "train.local_steps=10", "privacy.sample.accountant"):
        assert key in text
    with pytest.raises(ConfigError, match="train.local_steps"):  # `fedtune run`'s preflight
        preflight(load_config(None, sets))
    check_planned_steps(load_config(None, [*sets[:2], "privacy.sample.accountant=rdp"]))
    check_planned_steps(load_config(None, [*sets, "privacy.sample.enabled=false"]))


def test_an_operators_epochs_plan_past_the_bound_is_refused_at_discovery_naming_the_keys():
    """A plan by train.local_epochs depends on the partitions' sizes: the first discovery
    refuses the run (ConfigError naming the keys), never a node's claim."""
    cfg = load_config(None, ["data.num_clients=3", "train.clients_per_round=2",
                             "train.rounds=8", "train.local_epochs=1", "train.batch_size=1",
                             "privacy.sample.noise_multiplier=2.5"])
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [100, 70, 40], state)
    with pytest.raises(ConfigError) as refused:  # 100 steps a round x 8 rounds > 500
        ledger.use_example_counts({0: 100, 1: 70, 2: 40})
    text = str(refused.value)
    assert "\n" not in text and "partition 0's DP plan" in text
    for key in ("train.rounds", "train.local_epochs", "train.batch_size",
                "privacy.sample.accountant=rdp"):
        assert key in text

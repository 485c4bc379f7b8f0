"""ATTACK29E: FIX29M refuses "an operator's fixed-steps DP plan past the accountant's steps
bound at preflight"; a split run with smashed DP releases its split steps besides DP-SGD's,
so preflight must count them, not admit a plan that the first discovery then refuses."""

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.privacy.plan import PrivacyPlan, check_planned_steps
from fedtune.run.checkpoint import ServerState
from fedtune.split.plan import smashed_privacy_events
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
SETS = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=5",
        "train.local_steps=60", "train.batch_size=32", "privacy.sample.accountant=prv",
        "privacy.sample.noise_multiplier=2.5", "privacy.sample.target_epsilon=50",
        "split.enabled=true", "split.smashed_dp.enabled=true",
        "split.smashed_dp.noise_multiplier=2.0"]


def test_preflight_counts_the_smashed_steps_a_split_plan_releases():
    """A fixed-steps split plan whose DP-SGD plus smashed steps pass PRV's bound is refused
    at preflight (check_planned_steps), or else admitted by discovery too."""
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    ledger.plan_hooks.append(lambda rnd, pid, n: smashed_privacy_events(cfg, n))
    try:
        check_planned_steps(cfg)  # 5 x 60 = 300 DP-SGD steps: within 500
    except ConfigError:
        return  # refused before start-up: what FIX29M promises
    # main: admitted at preflight, then the first discovery (after Ray and the model were
    # started) raises "DP history of 600 steps, at most 500": 300 DP-SGD + 300 smashed.
    try:
        ledger.use_example_counts(dict(enumerate(SIZES)))
    except ConfigError as exc:
        pytest.fail(f"preflight admitted the split plan, discovery refused it: {exc}")


def test_preflight_counts_the_sizes_a_pruning_plugin_plans_each_round():
    """A fixed-steps plan with a plugin's trained sizes (el2n: n and the kept share, each
    planned in every round by `_every_round`) is refused at preflight or admitted by the
    first discovery, never admitted by one and refused by the other."""
    sets = [s for s in SETS if not s.startswith("split.")]
    cfg = load_config(None, sets)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    ledger.size_hooks.append(lambda n: [max(1, n // 4)])  # as el2n's trained_sizes
    try:
        check_planned_steps(cfg)  # 300 steps
    except ConfigError:
        return
    # main: discovery raises "DP history of 600 steps, at most 500" (both sizes each round,
    # though a client is charged only the costliest one a round: 300 steps).
    try:
        ledger.use_example_counts(dict(enumerate(SIZES)))
    except ConfigError as exc:
        pytest.fail(f"preflight admitted the pruned plan, discovery refused it: {exc}")

"""ATTACK29E: a deployment node's claim is checked at discovery "before any accountant
call"; under calibrated noise the check first calibrates the claim's noise over the run's
steps (up to PRV's 500), a search of many full accountant calls per distinct claim: one
node's word must cost the server about a second, not many."""

import time

import numpy as np

from fedtune.config import load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
# 50 rounds x 10 steps = 500: PRV's bound; calibrated noise at a target of 8.
SETS = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=50",
        "train.local_steps=10", "train.batch_size=32", "privacy.sample.accountant=prv",
        "privacy.sample.target_epsilon=8"]


def test_one_nodes_claim_costs_the_server_about_a_second_at_discovery():
    """Admitting or refusing one node's claim (10^7 examples for partition 0, within the
    wire's bound) takes under 3 s of the server's discovery."""
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    start = time.perf_counter()
    ledger.use_example_counts({0: 10**7})
    took = time.perf_counter() - start
    # main: ~5 s (calibration at q 3.2e-6); at target_epsilon 50 and q 0.01 the same
    # search took 32 s and 1.5 GB; every distinct claim pays it again.
    assert took < 3.0, f"one node's claim cost the server {took:.1f} s at discovery"

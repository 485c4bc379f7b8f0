"""ATTACK29E: under calibrated noise FIX29M's budget stop (`_budget`) lets a client's epsilon
grow to "what the plan itself spends", computed with every size a plugin allows charged in
every round; the plan charges only the costliest one a round, so after a kill and a resume
the released epsilon passes both the target and anything the plan spends, with no stop."""

import numpy as np

from fedtune.config import load_config
from fedtune.privacy import DPHistory
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
EVERYONE = [0, 1, 2]
SETS = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
        "train.local_steps=5", "train.batch_size=32", "privacy.sample.target_epsilon=8",
        "privacy.sample.accountant=rdp"]  # noise_multiplier 0: calibrated


def _ledger(cfg, state=None, folder=None):
    state = state or ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x",
                                 initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state, folder)
    # As the pruning plugin's `trained_sizes` hook: a client may train on a quarter.
    ledger.releases.size_hooks.append(lambda n: [max(1, n // 4)])
    return ledger, state


def _run(ledger, state, rounds):
    for rnd in rounds:
        if ledger.stop(rnd, EVERYONE) is not None:
            return
        ledger.charge_sent(rnd, EVERYONE)
        ledger.settle(rnd)
        state.round = rnd


def test_a_killed_pruned_calibrated_run_stays_within_what_its_plan_spends(tmp_path):
    """A calibrated run with a plugin's sizes, killed in round 3 and resumed, releases no
    epsilon over the larger of target_epsilon and what the same run spends with no kill."""
    cfg = load_config(None, SETS)
    honest, state = _ledger(cfg)
    _run(honest, state, (1, 2, 3, 4))
    planned = max(state.client_eps.values())  # 8.11: the sizes calibrated apart
    ledger, state = _ledger(cfg, folder=tmp_path)
    _run(ledger, state, (1, 2))
    saved = ServerState(round=2, vector=state.vector, spec_hash="x", initial={},
                        client_dp={k: DPHistory(list(v.entries))
                                   for k, v in state.client_dp.items()},
                        client_eps=dict(state.client_eps))
    ledger.charge_sent(3, EVERYONE)  # round 3 sent, then the run is killed
    resumed, state = _ledger(cfg, state=saved, folder=tmp_path)  # charges the attempt
    _run(resumed, state, (3, 4))
    released = resumed.spent()["epsilon_sample"]
    # main: 9.11 released, no stop: `_budget` is 11.92 (both sizes charged every round).
    assert released <= max(8.0, planned) + 1e-9, (
        f"released epsilon_sample {released:.4f}, over target 8 and the plan's "
        f"{planned:.4f}, and no budget stop")

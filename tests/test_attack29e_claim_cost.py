"""ATTACK29E: under calibrated noise every node's example-count claim at discovery went
through a noise calibration (Opacus' search: 13-25 accountant calls) and the history check:
one claim cost 6.6 s of the server's time, N claims at distinct sample rates N x that.

The server now makes at most `MAX_CLAIM_CALIBRATIONS` new calibrations for claims per
discovery: a claim that needs one more is refused at once with its reason, a claim at a
sample rate already calibrated costs no calibration, and an admitted claim's plan is the
one Opacus' own calibration gives (the charges, hence every epsilon, as before)."""

import time

import numpy as np
import pytest
from opacus.accountants.utils import get_noise_multiplier

import strategies.privacy_ledger as privacy_ledger
from fedtune.config import load_config
from fedtune.privacy import calibrate_noise
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

B = 32
SETS = ["data.num_clients=12", "train.clients_per_round=2", "train.rounds=4",
        "train.local_steps=25", f"train.batch_size={B}", "privacy.sample.accountant=prv",
        "privacy.sample.target_epsilon=8"]  # noise_multiplier 0: calibrated
SIZES = [100, 70] + [40] * 10


def test_claims_at_distinct_sample_rates_cost_a_bounded_number_of_calibrations(monkeypatch):
    monkeypatch.setattr(privacy_ledger, "MAX_CLAIM_CALIBRATIONS", 2, raising=False)
    calibrate_noise.cache_clear()
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    # Partitions 2-11: nodes with their own data files, each claiming a count of its own
    # sample rate (q = 1 / k, k = 10 .. 18), and partition 11 one at partition 2's rate.
    claims = {pid: B * (8 + pid) for pid in range(2, 11)}
    claims[11] = claims[2] - 5
    took: dict[int, float] = {}
    decide = ledger._claim_refusal

    def timed(pid, n):
        start = time.process_time()
        try:
            return decide(pid, n)
        finally:
            took[pid] = time.process_time() - start

    monkeypatch.setattr(ledger, "_claim_refusal", timed)
    refused = ledger.use_example_counts({0: 100, 1: 70, **claims})
    slow = sorted(pid for pid, t in took.items() if t >= 1.0 and pid >= 2)
    assert len(slow) <= 2, (
        f"claims {slow} each took over 1 s of CPU "
        f"({', '.join(f'{took[p]:.1f}' for p in slow)} s): more than the 2 calibrations "
        "a discovery allows")
    assert set(refused) == set(range(4, 11)), refused  # the 3rd new sample rate on
    assert all("calibration" in refused[pid] for pid in refused)
    assert 11 not in refused  # partition 2's rate: calibrated already
    for pid in (2, 11):  # admitted: the noise is Opacus' own calibration for its rate
        sigma, q, steps = ledger.planned(1, pid)[0]
        assert q == 1 / np.ceil(claims[pid] / B)
        assert sigma == get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5,
                                             sample_rate=q, steps=4 * 25, accountant="prv")


def test_a_later_discovery_gets_its_own_calibrations():
    """The bound is per discovery (a resume's may admit new nodes), and a refused claim
    was charged nothing."""
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    left = privacy_ledger.MAX_CLAIM_CALIBRATIONS
    privacy_ledger.MAX_CLAIM_CALIBRATIONS = 0
    try:
        refused = ledger.use_example_counts({0: 100, 2: B * 30})
    finally:
        privacy_ledger.MAX_CLAIM_CALIBRATIONS = left
    assert set(refused) == {2} and 2 not in state.client_dp
    assert ledger.use_example_counts({0: 100, 2: B * 30}) == {}


@pytest.mark.parametrize("noise", ["0", "2.5"])
def test_the_partitions_own_sizes_are_never_counted(noise, monkeypatch):
    """The operator's partitions are planned whatever the bound (a plan of theirs that
    cannot be accounted is a ConfigError, as before)."""
    monkeypatch.setattr(privacy_ledger, "MAX_CLAIM_CALIBRATIONS", 0, raising=False)
    cfg = load_config(None, [*SETS, f"privacy.sample.noise_multiplier={noise}"])
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    assert ledger.use_example_counts({pid: n for pid, n in enumerate(SIZES)}) == {}

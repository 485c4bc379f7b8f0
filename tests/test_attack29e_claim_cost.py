"""ATTACK29E: under calibrated noise every node's example-count claim at discovery went
through a noise calibration (Opacus' search: 13-25 accountant calls) and the history check:
one claim cost 6.6 s of the server's time, N claims at distinct sample rates N x that.

Each claim may now cause at most `CALIBRATIONS_PER_CLAIM` new calibrations (one per example
count it trains on), and a partition is claimed once, so a discovery's work is bounded by
the operator's population: a hostile node costs what an honest one does. A claim at a
sample rate already calibrated costs no calibration, honest nodes at many distinct rates
are all admitted, and an admitted claim's plan is the one Opacus' own calibration gives
(the charges, hence every epsilon, as before)."""

import time

import numpy as np
import pytest
from opacus.accountants.utils import get_noise_multiplier

import fedtune.privacy.accounting as privacy_ledger_accounting
import strategies.claim_admission as claim_admission
from fedtune.config import load_config
from fedtune.privacy import calibrate_noise
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

B = 32
# RDP: the bound counts calibrations whatever the accountant, and RDP's are ~0.05 s where
# PRV's are 1-2 s (nine claims would cost the suite ~20 s of CPU).
SETS = ["data.num_clients=12", "train.clients_per_round=2", "train.rounds=4",
        "train.local_steps=25", f"train.batch_size={B}", "privacy.sample.accountant=rdp",
        "privacy.sample.target_epsilon=8"]  # noise_multiplier 0: calibrated
SIZES = [100, 70] + [40] * 10


def _ledger() -> PrivacyLedger:
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)


def _counting_calibrations(monkeypatch) -> list[float]:
    """The sample rates of the calibrations made (cache misses) from here on."""
    made: list[float] = []
    search = privacy_ledger_accounting.search_noise

    def counted(target, delta, q, steps, accountant):
        made.append(q)
        return search(target, delta, q, steps, accountant)

    monkeypatch.setattr(privacy_ledger_accounting, "search_noise", counted)
    calibrate_noise.cache_clear()
    return made


def test_each_claim_costs_at_most_its_own_calibrations_and_honest_nodes_are_admitted(
        monkeypatch):
    made = _counting_calibrations(monkeypatch)
    ledger = _ledger()
    # Partitions 2-10: nodes with their own data files, each claiming a count of its own
    # sample rate (q = 1 / k, k = 10 .. 18), and partition 11 one at partition 2's rate.
    claims = {pid: B * (8 + pid) for pid in range(2, 11)}
    claims[11] = claims[2] - 5
    took: dict[int, float] = {}
    decide = ledger.claims.refusal

    def timed(pid, n, **kwargs):
        start = time.process_time()
        try:
            return decide(pid, n, **kwargs)
        finally:
            took[pid] = time.process_time() - start

    monkeypatch.setattr(ledger.claims, "refusal", timed)
    refused = ledger.use_example_counts({0: 100, 1: 70, **claims})
    assert refused == {}, refused  # nine distinct honest rates: none refused
    rates = {1 / np.ceil(n / B) for n in [100, 70, *claims.values()]}
    assert sorted(made) == sorted(rates), made  # one each, partition 11's shared with 2
    assert took[11] < 0.5, f"a claim at a calibrated rate took {took[11]:.2f} s"
    print("seconds per claim:", {pid: round(t, 2) for pid, t in sorted(took.items())})
    for pid in (2, 11):  # admitted: the noise is Opacus' own calibration for its rate
        sigma, q, steps = ledger.planned(1, pid)[0]
        assert q == 1 / np.ceil(claims[pid] / B)
        assert sigma == get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5,
                                             sample_rate=q, steps=4 * 25, accountant="rdp")


def test_a_claim_needing_more_calibrations_than_a_claim_may_cause_is_refused(monkeypatch):
    """The bound per claim holds (at 0 every new rate passes it), the refusal names it,
    a refused claim was charged nothing, and the next discovery decides afresh."""
    calibrate_noise.cache_clear()
    ledger = _ledger()
    monkeypatch.setattr(claim_admission, "CALIBRATIONS_PER_CLAIM", 0)
    refused = ledger.use_example_counts({0: 100, 2: B * 30})
    assert set(refused) == {2} and 2 not in ledger.state.client_dp
    assert "calibrations a claim may cause" in refused[2]
    monkeypatch.setattr(claim_admission, "CALIBRATIONS_PER_CLAIM", 4)
    assert ledger.use_example_counts({0: 100, 2: B * 30}) == {}


@pytest.mark.parametrize("noise", ["0", "2.5"])
def test_the_partitions_own_sizes_are_never_counted(noise, monkeypatch):
    """The operator's partitions are planned whatever the bound (a plan of theirs that
    cannot be accounted is a ConfigError, as before)."""
    monkeypatch.setattr(claim_admission, "CALIBRATIONS_PER_CLAIM", 0)
    cfg = load_config(None, [*SETS, f"privacy.sample.noise_multiplier={noise}"])
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    assert ledger.use_example_counts({pid: n for pid, n in enumerate(SIZES)}) == {}

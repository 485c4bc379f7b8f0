"""ATTACK29G: outside a secret cohort the ledger charges a pruning client, each round, the
one size whose release gives the largest epsilon on top of what it spent so far
(`PrivacyLedger._costliest_after`, used by `planned` for the charge and by `_claimed_plan` /
`_as_charged` for discovery and the budget). Epsilon at one delta does not order privacy
mechanisms: a release that costs more epsilon now can cost less once composed with later
rounds. With `train.local_epochs` the two sizes of `el2n_pruning` are different mechanisms
(all n: q = 1/3, 3 steps; the kept share: q = 1, 1 step), the greedy picks the full size in
round 1, and the charged history's epsilon ends below the epsilon of what the honest client
really released (its kept share every round: `clients/plugins/el2n.py` scores at its first
participation and trains on the kept indices from then on) by an independent PLD accountant,
and past privacy.sample.target_epsilon with no stop."""

import numpy as np
from independent_accountant import pld_epsilon
from ledger_rounds import first_stop

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from fedtune.config import load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.plugins.base import build_plugins
from strategies.privacy_ledger import PrivacyLedger

N, B, ROUNDS, TARGET, DELTA = 40, 16, 3, 8.2, 1e-5
SETS = ["data.num_clients=2", "train.clients_per_round=1", f"train.batch_size={B}",
        "privacy.sample.accountant=prv", f"privacy.sample.delta={DELTA}",
        "privacy.sample.noise_multiplier=1.0", f"privacy.sample.target_epsilon={TARGET}",
        f"train.rounds={ROUNDS}", "train.local_epochs=1"]


def _pld(entries) -> float:
    return pld_epsilon(entries, DELTA)


def test_a_pruning_clients_charge_bounds_its_kept_share_every_round():
    """Adversary: whoever sees a pruning client's uploads (the server included); invariant:
    THREATS 2 (a client's reported epsilon is never below the accountant's value for the
    releases it actually made) and the budget stop (no round takes it past the target)."""
    cfg = load_config(None, SETS)
    cfg.plugins.append({"name": "el2n_pruning", "keep": 0.4, "allow_with_sample_dp": True})
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [N, N], state)
    ledger.releases.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    assert ledger.use_example_counts({0: N, 1: N}) == {}
    kept = PrivacyPlan.of(cfg).release(16)  # kept(40) = ceil(0.4 x 40) = 16: q 1, 1 step
    assert kept == (1.0, 1.0, 1)
    stop = first_stop(ledger, state, ROUNDS, [0])
    charged = state.client_eps[0]
    ran = state.round  # the rounds client 0 trained in before the first stop, if any
    released = _pld([(kept[0], kept[1], kept[2] * ran)])  # its kept share, every round
    assert charged >= released, (
        f"client 0 trained on its kept share in all {ran} rounds (independent PLD epsilon "
        f"{released:.4f}) but is charged {charged:.4f} (history "
        f"{state.client_dp[0].entries}); stop: {stop}")
    # The kept share over all 3 rounds passes the target: a round that would take it
    # there must not run (the budget stop), so the charge never passes the target either.
    assert _pld([(kept[0], kept[1], kept[2] * ROUNDS)]) > TARGET
    assert ran < ROUNDS and stop is not None and charged <= TARGET, (ran, stop, charged)


def test_discovery_refuses_a_claim_whose_kept_share_passes_the_target():
    """Adversary: none needed (an honest node with its own data file of 40 rows), or a node
    choosing its count; invariant: the ledger's claim rule (under a given noise a claim whose
    plan passes privacy.sample.target_epsilon is refused) checked on what the client really
    releases, THREATS 2."""
    cfg = load_config(None, SETS)
    cfg.plugins.append({"name": "el2n_pruning", "keep": 0.4, "allow_with_sample_dp": True})
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [64, 64], state)
    ledger.releases.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    kept = PrivacyPlan.of(cfg).release(16)
    released = _pld([(kept[0], kept[1], kept[2] * ROUNDS)])
    assert released > TARGET
    refused = ledger.use_example_counts({0: 64, 1: N})  # node 1's own file: 40 rows
    assert 1 in refused, (
        f"a claim of {N} examples was admitted: trained on its kept share in all {ROUNDS} "
        f"rounds it spends {released:.4f} (independent PLD), over target {TARGET}")

"""ATTACK29G: since `_claimed_plan` (ATTACK29F 1) a claim outside a secret cohort is planned
by `_charged_over`, which picks the costliest size each round by running the accountant on
every size after every round (`_costliest_after`): a pruning run's claim costs rounds x sizes
accountant compositions at discovery, none of them counted by `CALIBRATIONS_PER_CLAIM`.
docs/privacy.md ("Claims at discovery") promises one composition a claim under a given noise
multiplier. Measured with PRV (100 rounds x 5 steps, sigma 1, el2n keep 0.5; 2-core box at
load 5-7): the partitions' own size and one claim at a new rate, 400 compositions, 48.6 s of
CPU, ~24 s each; at 500 rounds x 1 step (PRV's bound), 2,000 compositions and 233.9 s of
CPU, ~117 s a distinct count (2026-12-07 06:09-06:17 UTC, load 6-7, main 74883fe). Every
further hostile claim at a new rate adds as much to the discovery the whole run waits on,
and every distinct partition size of the operator's own (Dirichlet partitions) pays it too."""

import numpy as np

import strategies.plugins  # noqa: F401 (registers the plugins and their sizes)
from fedtune.config import load_config
from fedtune.privacy import accounting
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.plugins.base import build_plugins
from strategies.privacy_ledger import PrivacyLedger

B, ROUNDS = 16, 100
SETS = ["data.num_clients=4", "train.clients_per_round=1", f"train.batch_size={B}",
        "privacy.sample.accountant=rdp", f"train.rounds={ROUNDS}", "train.local_steps=5",
        "privacy.sample.noise_multiplier=1.0", "privacy.sample.target_epsilon=50"]


def test_a_claim_under_a_given_noise_costs_a_bounded_number_of_compositions(monkeypatch):
    """Adversary: a node claiming a new example count at discovery (in the operator's
    roster, or any simulated node); invariant: THREATS 4 (every client value has a
    compute-time bound before it is used; docs/privacy.md: one accountant composition a
    claim under a given noise multiplier)."""
    cfg = load_config(None, SETS)
    cfg.plugins.append({"name": "el2n_pruning", "keep": 0.5, "allow_with_sample_dp": True})
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [64] * 4, state)
    ledger.releases.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    assert ledger.use_example_counts({0: 64, 1: 64, 2: 64}) == {}  # the operator's sizes
    calls = []
    real = accounting.bounded_epsilon
    monkeypatch.setattr(accounting, "bounded_epsilon",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    accounting._epsilon.cache_clear()
    claim = B * 37 + 5  # its own data file: q = 1/38, a rate no partition has
    assert ledger.use_example_counts({3: claim}) == {}
    sizes = len(ledger.releases.releases(claim))
    assert len(calls) <= sizes, (
        f"one node's claim of {claim} examples cost {len(calls)} accountant compositions at "
        f"discovery ({ROUNDS} rounds x {sizes} sizes; the docs say one)")

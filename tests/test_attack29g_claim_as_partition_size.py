"""ATTACK29G: `PrivacyLedger._claim_refusal` tells a node's claim from the operator's data by
its value alone (`own_size = partition_sizes[pid] == n`). In a deployment a node with its own
data file (node config `data-path`) reports its count at discovery; when it reports exactly
its partition's size in the server's corpus, that count skips every check a claim gets (the
calibration bound, the refusal with a reason, the target check under a given noise) and is
planned as the operator's: a plan the server cannot account is a ConfigError that ends the
run, and a plan over the target is admitted and stops the run for everyone. One more example
(or one fewer) is refused for that node only and the run goes on. In a deployment whose nodes
all train on their own files the corpus partitions' plans are never run, so nothing but that
node's report brings them in.

The server now passes the ledger which counts a node reported (`Roster.own_examples`, as
`DeltaFedAvg.claimed`); these tests call `use_example_counts` as the server does, every
node here training on its own file."""

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

B = 16


def _ledger(sets, sizes):
    cfg = load_config(None, sets)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), sizes, state)


def test_a_node_reporting_its_partitions_size_cannot_end_the_run():
    """Adversary: a deployment node in the operator's roster, with its own data file,
    reporting its partition's corpus size as its count; invariant: THREATS 4 (a bad reply
    is rejected with a reason, never ending a run)."""
    sets = ["data.num_clients=4", "train.clients_per_round=2", f"train.batch_size={B}",
            "train.rounds=10", "train.local_epochs=1", "privacy.sample.accountant=prv",
            "privacy.sample.noise_multiplier=2.0", "privacy.sample.target_epsilon=100"]
    # The server's corpus partitions; partition 3's plan is 10 x 63 = 630 PRV steps (> 500).
    sizes = [200, 200, 200, 1000]
    claims = {0: 150, 1: 180, 2: 210}  # the honest nodes' own files: 10 x 10..14 steps
    one_more = _ledger(sets, sizes).use_example_counts({**claims, 3: 1001}, {*claims, 3})
    assert set(one_more) == {3}  # refused with its reason, the run goes on
    try:
        refused = _ledger(sets, sizes).use_example_counts({**claims, 3: 1000}, {*claims, 3})
    except ConfigError as exc:
        pytest.fail(f"node 3 reported 1000 examples (its partition's corpus size, which "
                    f"no node trains on) and the run ended: {exc}")
    assert set(refused) == {3}


def test_a_node_reporting_its_partitions_size_is_checked_against_the_target():
    """Adversary: as above; invariant: the ledger's own rule (a claim whose plan passes
    privacy.sample.target_epsilon under a given noise is refused: admitted it would stop the
    run for everyone), THREATS 4."""
    sets = ["data.num_clients=4", "train.clients_per_round=2", f"train.batch_size={B}",
            "train.rounds=10", "train.local_steps=5", "privacy.sample.accountant=rdp",
            "privacy.sample.noise_multiplier=1.0", "privacy.sample.target_epsilon=8"]
    sizes = [400, 400, 400, 32]  # partition 3: q = 1/2, 50 steps at sigma 1: far past 8
    claims = {0: 300, 1: 350, 2: 420}
    assert set(_ledger(sets, sizes).use_example_counts({**claims, 3: 33}, {*claims, 3})) == {3}
    refused = _ledger(sets, sizes).use_example_counts({**claims, 3: 32}, {*claims, 3})
    assert set(refused) == {3}, (
        "node 3 reported 32 examples (its partition's corpus size): admitted without the "
        "target check, so the first round that samples it stops the run for everyone")

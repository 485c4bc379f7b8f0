"""ATTACK29E: under user-level DP (cohorts kept apart) summary.json is a release: its privacy
sections must not list clients by partition (FIX29M takes them from the ledger's fields,
`PrivacyLedger.spent`, which the round records split for the curator's log first)."""

from types import SimpleNamespace

import numpy as np

import strategies.server as server
from fedtune.config import load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from fedtune.run.curator_log import COHORT_PARTS, split_record
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
SETS = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=3",
        "train.local_steps=5", "train.batch_size=32", "privacy.sample.accountant=rdp",
        "privacy.sample.noise_multiplier=2.5", "privacy.sample.target_epsilon=50",
        "privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
        "privacy.user.target_epsilon=50"]


def _summary_of_a_run_with_cohorts(cohorts, monkeypatch):
    cfg = load_config(None, SETS)
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    assert ledger.cohort_secret
    history = []
    for rnd, cohort in enumerate(cohorts, start=1):
        assert ledger.stop(rnd, cohort) is None
        ledger.charge_sent(rnd, cohort)
        ledger.settle(rnd)
        state.round = rnd
        fields = ledger.fields()
        record, _curator = split_record({"round": rnd, "no_contribution": not cohort,
                                         **fields}, cfg)
        history.append(record)
    kind = SimpleNamespace(summary_fields=lambda *a: {}, baseline=lambda *a: {})
    monkeypatch.setattr(server, "task_kind", lambda name: kind)
    monkeypatch.setattr(server, "validation_examples", lambda task, cfg: 0)
    monkeypatch.setattr(server, "pruning_record", lambda backbone, length: {})
    task = SimpleNamespace(spec=SimpleNamespace(size=4), backbone=SimpleNamespace(num_params=9))
    # As run_server makes it at the end of a run.
    return server._summary(history, state, task, cfg, {}, ledger.spent()).to_json(), history


def test_summary_privacy_sections_name_no_client_of_a_secret_cohort(monkeypatch):
    """summary.json under user-level DP holds none of the per-client privacy parts that
    rounds.jsonl moves to the curator's log (histories, epsilon_by_client, interrupted ids)."""
    summary, history = _summary_of_a_run_with_cohorts([[0], [0, 2], [2]], monkeypatch)
    leaked = {f"{section}.{key}": summary[section][key] for section, key in COHORT_PARTS
              if isinstance(summary.get(section), dict)
              and isinstance(summary[section].get(key), (dict, list))}
    # main: privacy_sample.histories {'0': ..., '2': ...} and epsilon_by_client name the
    # sampled partitions (client 1 never drawn), where rounds.jsonl holds the moved note.
    assert not leaked, f"summary.json names the secret cohorts' clients: {sorted(leaked)}"
    assert summary["privacy_sample"] == history[-1]["privacy_sample"]


def test_summary_is_the_same_whoever_the_secret_cohorts_held(monkeypatch):
    """Two runs whose secret cohorts differ (same rounds) release the same summary privacy
    sections."""
    one, _ = _summary_of_a_run_with_cohorts([[0], [0], [0]], monkeypatch)
    other, _ = _summary_of_a_run_with_cohorts([[1], [2], []], monkeypatch)
    for key in ("epsilon_sample", "epsilon_user", "privacy_sample", "privacy_user"):
        assert one[key] == other[key], f"summary.json's {key} differs with the secret cohort"

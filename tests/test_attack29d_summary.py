"""ATTACK29D: summary.json's epsilons are the ledger's as they stand (5befcc2); the privacy
parameters printed beside them must reproduce them, a resumed run's interrupted attempt
included."""

from types import SimpleNamespace

import numpy as np

import strategies.server as server
from fedtune.config import load_config
from fedtune.privacy import DPHistory
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
# Sample-level DP alone (cohorts logged): summary.json's privacy_sample holds each client's
# history and epsilon, the parameters that reproduce epsilon_sample.
SETS = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
        "train.local_steps=5", "train.batch_size=32", "privacy.sample.accountant=rdp",
        "privacy.sample.noise_multiplier=2.5", "privacy.sample.target_epsilon=4.3"]


def _ledger(state=None, folder=None):
    cfg = load_config(None, SETS)
    state = state or ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x",
                                 initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state, folder), cfg, state


def test_the_summary_privacy_section_reproduces_its_epsilon_after_a_resume(
        tmp_path, monkeypatch):
    """summary.json's epsilon_sample is the largest of its own privacy_sample.epsilon_by_client
    (and of what its histories give), also when a resumed run is stopped by the budget
    before the interrupted round reruns."""
    ledger, cfg, state = _ledger(folder=tmp_path)
    history = []
    for rnd in (1, 2):
        assert ledger.stop(rnd, [0, 1, 2]) is None
        ledger.charge_sent(rnd, [0, 1, 2])
        ledger.settle(rnd)
        state.round = rnd
        fields = ledger.fields()
        history.append({"round": rnd, "epsilon_sample": fields.pop("epsilon_sample"),
                        "epsilon_user": fields.pop("epsilon_user"), **fields})
    saved = ServerState(round=2, vector=state.vector, spec_hash="x", initial={},
                        client_dp={k: DPHistory(list(v.entries))
                                   for k, v in state.client_dp.items()},
                        client_eps=dict(state.client_eps))
    ledger.charge_sent(3, [2])  # round 3 sent to client 2, then the run is killed
    resumed, _, state = _ledger(state=saved, folder=tmp_path)  # charges the attempt
    assert resumed.stop(3, [2]) is not None  # the budget ends the resumed run here
    kind = SimpleNamespace(summary_fields=lambda *a: {}, baseline=lambda *a: {})
    monkeypatch.setattr(server, "task_kind", lambda name: kind)
    monkeypatch.setattr(server, "validation_examples", lambda task, cfg: 0)
    monkeypatch.setattr(server, "pruning_record", lambda backbone, length: {})
    task = SimpleNamespace(spec=SimpleNamespace(size=4), backbone=SimpleNamespace(num_params=9))
    summary = server._summary(history, state, task, cfg, {}, resumed.spent()).to_json()
    stated = summary["privacy_sample"]["epsilon_by_client"]
    # main: epsilon_sample 4.02 (client 2's rounds 1, 2 and the attempt at 3) beside
    # privacy_sample of round 2 (client 2 at 3.27, no interrupted attempt listed).
    assert summary["epsilon_sample"] == max(stated.values()), (
        f"summary epsilon_sample {summary['epsilon_sample']:.4f}, its privacy_sample "
        f"says {stated} (interrupted: {summary['privacy_sample']['interrupted_rounds_charged']})")

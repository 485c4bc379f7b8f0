"""MARKS30: an epsilon in a reason (a budget stop, a refused claim, a refused config) and the
per-client epsilons of the curator's log carry the marks every other output shows beside an
epsilon (`fedtune.run.epsilon_marks`): "a mechanism's epsilon is never shown next to data it
does not protect". The marks come from the run's config through the registry."""

import json

import numpy as np
import pytest
from budget_cases import RELEASED_BOUND_STOP
from inline_grid import TINY, inline_run

from fedtune.config import ConfigError, load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.privacy.randomness import SEEDED_NOISE_NOTE
from fedtune.run.checkpoint import ServerState
from fedtune.run.curator_log import read_curator
from fedtune.run.epsilon_marks import epsilon_note, run_marks
from strategies.privacy_ledger import PrivacyLedger

SEEDED = "privacy.reproducible_noise=true"
# The validation-direction setting and what it needs (tests/test_robust_validation.py).
VALIDATION = ["aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation"]


def _ledger(sets, sizes=(100, 70, 40)):
    """The ledger as the server builds it: the plan and the config's marks."""
    cfg = load_config(None, list(sets))
    state = ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), list(sizes), state, marks=run_marks(cfg)), state


def _one_line(reason: str | None) -> str:
    assert reason is not None and "\n" not in reason
    return reason


def test_a_user_level_budget_stop_shows_its_epsilon_with_the_seeded_noise_mark():
    # tests/test_user_dp.py's stop (epsilon 6.48 in round 3), in reproducible mode.
    ledger, _ = _ledger([SEEDED, "data.num_clients=4", "train.clients_per_round=2",
                         "privacy.sample.enabled=false", "privacy.user.enabled=true",
                         "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=6.0"],
                        sizes=())
    for rnd in (1, 2):
        assert ledger.stop_reason(rnd, [0, 1]) is None
        ledger.settle(rnd)
    reason = _one_line(ledger.stop_reason(3, [0, 1]))
    assert "the user-level epsilon to 6.48" in reason
    assert "[seeded noise], over privacy.user.target_epsilon=6.0" in reason


@pytest.mark.parametrize(("sets", "tags"), [
    ([SEEDED], "[seeded noise]"),
    (VALIDATION, "[validation rows]"),
    ([SEEDED, *VALIDATION], "[seeded noise; validation rows]"),
])
def test_a_clients_sample_level_budget_stop_shows_its_epsilon_with_its_marks(sets, tags):
    # tests/test_spend.py's stop: client 2 at 3.27 before its second round, over 3.
    ledger, _ = _ledger(["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
                         "train.local_steps=5", "train.batch_size=32",
                         "privacy.sample.accountant=rdp", "privacy.sample.noise_multiplier=2.5",
                         "privacy.sample.target_epsilon=3", *sets])
    ledger.charge_sent(1, [2])
    ledger.settle(1)
    reason = _one_line(ledger.stop_reason(2, [0, 2]))
    assert "client 2's sample-level epsilon to 3.27" in reason
    assert f" {tags}, over privacy.sample.target_epsilon=3" in reason


def test_a_stop_against_the_calibrated_plans_spend_marks_both_epsilons():
    """Calibrated noise with a release calibrated apart (a hook, as split mode's smashed
    data): the budget a killed round's charge passes is what the plan spends, an epsilon of
    the same mechanism; it is shown with the marks too."""
    ledger, _ = _ledger([SEEDED, *VALIDATION, "data.num_clients=3",
                         "train.clients_per_round=3", "train.rounds=2",
                         "train.local_steps=5", "train.batch_size=32",
                         "privacy.sample.accountant=rdp", "privacy.sample.target_epsilon=3"])
    ledger.releases.plan_hooks.append(lambda rnd, pid, n: [(2.0, 0.5, 3)])
    ledger.charge_sent(1, [2])  # round 1 killed after it was sent, then replayed
    ledger.charge_sent(1, [2])
    ledger.settle(1)
    reason = _one_line(ledger.stop_reason(2, [2]))
    assert reason.count("[seeded noise; validation rows]") == 2, reason
    assert "the calibrated plan spends" in reason


def test_a_stop_on_the_released_bound_shows_it_with_its_marks():
    """Under a secret cohort the stop follows the released bound (a client sampled in
    every round): shown with the sample level's marks."""
    ledger, _ = _ledger([SEEDED, "data.num_clients=3", "train.clients_per_round=3",
                         "train.rounds=4", "train.local_steps=5", "train.batch_size=32",
                         "privacy.sample.accountant=rdp", "privacy.sample.noise_multiplier=2.5",
                         "privacy.sample.target_epsilon=3", "privacy.user.enabled=true",
                         "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50"])
    ledger.charge_sent(1, [2])
    ledger.settle(1)
    reason = _one_line(ledger.stop_reason(2, [0]))
    assert "released sample-level bound (a client sampled in every round) to 3.27" in reason
    assert " [seeded noise], over privacy.sample.target_epsilon=3" in reason


@pytest.mark.parametrize(("sets", "tags"), [
    ([SEEDED], "[seeded noise]"),
    (VALIDATION, "[validation rows]"),
])
def test_a_refused_claim_shows_its_epsilon_with_its_marks(sets, tags):
    """A node's count that would spend past the target under a given noise multiplier is
    refused (strategies.claim_admission); its reason's epsilon is marked as any other."""
    ledger, _ = _ledger(["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
                         "train.local_steps=5", "train.batch_size=32",
                         "privacy.sample.accountant=rdp", "privacy.sample.noise_multiplier=2.5",
                         "privacy.sample.target_epsilon=5", *sets])
    # 10 examples: every one in each step (q = 1), 20 steps at sigma 2.5.
    refused = ledger.use_example_counts({0: 100, 1: 70, 2: 10}, claimed={2})
    reason = _one_line(refused.get(2))
    assert "claims 10 examples for partition 2" in reason
    assert "would spend sample-level epsilon " in reason
    assert f" {tags}, over privacy.sample.target_epsilon=5" in reason


def test_a_user_noise_too_small_for_one_round_shows_its_epsilon_with_the_mark():
    from fedtune.sim.driver import check_user_budget

    cfg = load_config(None, [SEEDED, "privacy.user.enabled=true",
                             "privacy.user.noise_multiplier=0.3",
                             "privacy.user.target_epsilon=1"])
    with pytest.raises(ConfigError) as err:
        check_user_budget(cfg)
    message = _one_line(str(err.value))
    assert "[seeded noise] in the first round alone" in message


@pytest.mark.usefixtures("task_identity")
def test_a_run_stopped_on_a_budget_states_the_mark_in_summary_and_curator_log(
        tmp_path, monkeypatch):
    """A real run in process (the server builds its ledger itself): both levels, seeded
    noise. The released stop reason carries the mark, and each curator's-log entry's
    per-client epsilons carry the note summary.json's epsilon_sample carries."""
    # The released bound passes 0.14 before round 2 (budget_cases.RELEASED_BOUND_STOP).
    cfg = load_config(None, [*TINY, SEEDED, *RELEASED_BOUND_STOP])
    out = tmp_path / "run"
    inline_run(cfg, out, monkeypatch)
    summary = json.loads((out / "summary.json").read_text())
    reason = _one_line(summary["stopped_early"]["reason"])
    # 0.14185...: shown rounded up (never below the accountant's figure).
    assert "to 0.1419 [seeded noise], over privacy.sample.target_epsilon=0.14" in reason
    entries = [e for e in read_curator(out) if "privacy_sample" in e]
    assert entries, "no curator's-log entry holds the per-client epsilons"
    for entry in entries:
        section = entry["privacy_sample"]
        assert section["epsilon_by_client"], entry
        note = section.get("epsilon_by_client_note")
        assert note == summary["epsilon_sample_note"] == epsilon_note(cfg, "sample", 0.1)
        assert SEEDED_NOISE_NOTE in note


def test_the_curator_logs_epsilons_by_client_carry_their_note_null_when_there_are_none():
    from fedtune.run.curator_log import MOVED_NOTE, split_record

    cfg = load_config(None, [SEEDED, "privacy.user.enabled=true"])
    for by_client, note in (({"0": 2.5, "2": 3.1}, epsilon_note(cfg, "sample", 3.1)),
                            ({}, None)):
        record = {"round": 1, "privacy_sample": {"epsilon_by_client": by_client}}
        public, curator = split_record(record, cfg)
        assert public["privacy_sample"] == {"epsilon_by_client": MOVED_NOTE}
        assert curator["privacy_sample"] == {"epsilon_by_client": by_client,
                                             "epsilon_by_client_note": note}
    assert SEEDED_NOISE_NOTE in epsilon_note(cfg, "sample", 3.1)

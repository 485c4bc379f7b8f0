"""ATTACK29E: a run whose plan sits at the PRV steps bound (accepted by preflight and
discovery) that is killed once and resumed must end with a budget stop or complete, never
crash in the accountant's steps bound (every resume would crash the same: no summary)."""

import numpy as np
import pytest
from ledger_rounds import checkpoint_copy, play_rounds

from fedtune.config import load_config
from fedtune.config.accountant_steps import check_planned_steps
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
# 5 rounds x 100 steps = 500: PRV's bound exactly, so preflight admits it.
BASE = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=5",
        "train.local_steps=100", "train.batch_size=32", "privacy.sample.accountant=prv",
        "privacy.sample.noise_multiplier=8.0", "privacy.sample.target_epsilon=50"]
SECRET = ["privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
          "privacy.user.target_epsilon=50"]


def _ledger(cfg, state=None, folder=None):
    state = state or ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x",
                                 initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state, folder), state


@pytest.mark.parametrize("sets", [[], SECRET], ids=["cohort-logged", "secret-cohort"])
def test_a_resumed_run_at_the_steps_bound_never_crashes_in_the_bound(tmp_path, sets):
    """After a kill in round 3 and a resume, each later round's budget check returns a stop
    or None (no ValueError from check_history), and the released epsilon can be computed."""
    cfg = load_config(None, BASE + sets)
    check_planned_steps(cfg)  # preflight: admitted
    ledger, state = _ledger(cfg, folder=tmp_path)
    assert ledger.use_example_counts(dict(enumerate(SIZES))) == {}  # discovery: admitted
    everyone = [0, 1, 2]
    play_rounds(ledger, state, (1, 2), everyone)
    saved = checkpoint_copy(state)
    ledger.charge_sent(3, everyone)  # round 3 sent, then the run is killed
    resumed, state = _ledger(cfg, state=saved, folder=tmp_path)  # charges the attempt
    assert resumed.use_example_counts(dict(enumerate(SIZES))) == {}  # the resume's discovery
    stopped = None
    for rnd in (3, 4, 5):
        try:
            stopped = resumed.stop(rnd, everyone)
        except ValueError as exc:  # main: "DP history of 600 steps, at most 500" in round 5
            pytest.fail(f"round {rnd}'s budget check crashed, every resume will too: {exc}")
        if stopped is not None:
            break
        resumed.charge_sent(rnd, everyone)
        resumed.settle(rnd)
        state.round = rnd
    assert resumed.spent()["epsilon_sample"] is not None

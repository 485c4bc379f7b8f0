"""ATTACK29D: under calibrated sample-level noise (privacy.sample.noise_multiplier = 0) a
killed and resumed run charges its interrupted attempt, which "within budget by
construction" does not count: the budget stop must still keep every epsilon within the
target."""

import numpy as np
import pytest
from ledger_rounds import checkpoint_copy, play_rounds

from fedtune.config import load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
BASE = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
        "train.local_steps=5", "train.batch_size=32", "privacy.sample.target_epsilon=8",
        "privacy.sample.accountant=rdp"]
SECRET = ["privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
          "privacy.user.target_epsilon=50"]


def _ledger(sets, state=None, folder=None):
    cfg = load_config(None, BASE + list(sets))
    state = state or ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x",
                                 initial={})
    return PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state, folder), state


@pytest.mark.parametrize("sets", [SECRET, []], ids=["secret-cohort", "cohort-logged"])
def test_a_resumed_calibrated_run_stops_before_any_epsilon_passes_the_target(tmp_path, sets):
    """With calibrated noise, a run killed in round 3 and resumed never takes a charged
    client's epsilon, nor the released epsilon_sample, over privacy.sample.target_epsilon:
    the budget check stops it first."""
    ledger, state = _ledger(sets, folder=tmp_path)
    everyone = [0, 1, 2]
    play_rounds(ledger, state, (1, 2), everyone)
    saved = checkpoint_copy(state)
    ledger.charge_sent(3, everyone)  # round 3 sent, then the run is killed
    resumed, state = _ledger(sets, state=saved, folder=tmp_path)  # charges the attempt
    for rnd in (3, 4):
        if resumed.stop(rnd, everyone) is not None:
            break
        resumed.charge_sent(rnd, everyone)
        resumed.settle(rnd)
        state.round = rnd
    charged = max(state.client_eps.values())
    released = resumed.spent()["epsilon_sample"]
    # main: 9.0004 for both (client 2, sampled in rounds 1-4 and the lost attempt at 3),
    # and no stop: calibrated noise is taken as within budget by construction.
    assert charged <= 8.0, f"a client was charged epsilon {charged:.4f} over the target 8"
    assert released <= 8.0, f"summary.json's epsilon_sample {released:.4f} is over target 8"

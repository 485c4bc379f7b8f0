"""FIX29N (ATTACK29E finding 2): at PRV's steps bound, a round that would take a history past
it is a clean budget stop (a one-line reason), and a history charged past it (attempts of a
round killed and resumed) is accounted, never a crash of the ledger's constructor."""

import numpy as np
import pytest

# The plan at PRV's steps bound exactly (5 rounds x 100 steps), as ATTACK29E's reproducer.
from test_attack29e_resume_bound import BASE, SECRET, SIZES

from fedtune.config import load_config
from fedtune.privacy import DPHistory
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState, save_pending
from strategies.privacy_ledger import PrivacyLedger

EVERYONE = [0, 1, 2]


def _state(rounds: int, history: list) -> ServerState:
    return ServerState(round=rounds, vector=np.zeros(3, np.float32), spec_hash="x", initial={},
                       client_dp={pid: DPHistory(list(history)) for pid in EVERYONE})


@pytest.mark.parametrize("sets", [[], SECRET], ids=["cohort-logged", "secret-cohort"])
def test_the_round_past_the_steps_bound_is_a_one_line_budget_stop(sets):
    """Four rounds of 100 steps and one resumed attempt charged (500 steps): round 5 would
    take the history to 600, so it is a budget stop naming the accountant's bound."""
    cfg = load_config(None, BASE + sets)
    state = _state(4, [(8.0, 0.25, 500)])
    state.interrupted.append({"round": 3, "partition_ids": EVERYONE})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, state)
    stop = ledger.stop(5, EVERYONE)
    assert stop is not None
    assert "past what the prv accountant accounts" in stop.release
    assert "\n" not in stop.release and "\n" not in stop.curator


def test_a_charged_history_past_the_bound_is_accounted_on_load(tmp_path):
    """A pending round whose recorded attempts take the charged history past 500 steps: the
    resume's constructor accounts it (RDP, said in the summary's section) and stops the
    next round; it never raises."""
    cfg = load_config(None, BASE)
    save_pending(tmp_path, {"round": 3, "examples": {},
                            "attempts": [{str(pid): [[8.0, 0.25, 100]] for pid in EVERYONE}
                                         for _ in range(4)]})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), SIZES, _state(2, [(8.0, 0.25, 200)]),
                           tmp_path)
    spent = ledger.spent()
    assert spent["epsilon_sample"] > 0
    assert "RDP" in spent["privacy_sample"]["accountant_past_steps_bound"]
    assert ledger.stop(3, EVERYONE) is not None

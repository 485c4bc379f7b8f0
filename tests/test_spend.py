"""No lost spend: the server charges every client it asks to train, from the moment the
instruction is sent, with the same pure functions the client trains by; a reply can only
add to the charge; a round killed after it was sent is charged on resume (secret noise)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.checkpoint import PENDING_FILE, ServerState, load_pending
from fedtune.config import load_config
from fedtune.privacy import DPHistory, epsilon_of, planned_release, poisson_sample_rate
from fedtune.privacy.randomness import SECRET_NOISE_NOTE, SEEDED_NOISE_NOTE
from strategies.privacy_ledger import PrivacyLedger

SIZES = [100, 70, 40]
BASE = ["data.num_clients=3", "train.clients_per_round=3", "train.rounds=4",
        "train.local_steps=5", "train.batch_size=32", "privacy.sample.target_epsilon=8",
        "privacy.sample.accountant=rdp"]


def _ledger(sets=(), state=None, folder=None):
    cfg = load_config(None, BASE + list(sets))
    task = SimpleNamespace(partitions=[np.arange(n) for n in SIZES])
    state = state or ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x",
                                 initial={})
    return PrivacyLedger(cfg, task, state, folder), cfg, state


def _reply(pid, sigma, q, steps, history, epsilon=0.01):
    h = DPHistory(history)
    return {"partition_id": pid, "reported_dp": {
        "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "epsilon": epsilon,
        "history": h.to_lists()}}


def _copy(state):
    return ServerState(round=state.round, vector=state.vector, spec_hash="x", initial={},
                       client_dp={k: DPHistory(list(v.entries))
                                  for k, v in state.client_dp.items()})


def _eps(cfg, entries):
    return epsilon_of(DPHistory(entries), cfg.privacy.sample.delta,
                      cfg.privacy.sample.accountant)


def test_the_planned_release_is_the_rate_the_loader_samples_and_the_calibrated_sigma():
    cfg = load_config(None, BASE)
    sigma, q, steps = planned_release(cfg, 70)
    assert q == poisson_sample_rate(70, 32) == 1 / 3  # ceil(70 / 32) = 3 batches
    assert steps == 5
    # Calibrated: a client in all 4 rounds ends at (not over) the target.
    assert _eps(cfg, [(sigma, q, 4 * steps)]) <= 8.0
    assert _eps(cfg, [(sigma * 0.97, q, 4 * steps)]) > 8.0


def test_a_client_that_never_replies_is_charged_its_planned_steps():
    # A late reply (after train.round_timeout_s) or a crash reaches the server as a failed
    # entry with only the partition id: the client may have trained and uploaded anyway.
    ledger, cfg, state = _ledger()
    ledger.charge_sent(1, [0, 1, 2])
    ledger.settle(1, [{"partition_id": 1, "reason": "no reply within train.round_timeout_s"}])
    planned = planned_release(cfg, SIZES[1])
    assert state.client_dp[1].entries == [planned]
    assert state.client_dp[1].steps == cfg.train.local_steps
    fields = ledger.fields()
    assert fields["privacy_sample"]["histories"]["1"] == DPHistory([planned]).to_lists()
    assert fields["epsilon_sample"] == pytest.approx(
        max(_eps(cfg, [planned_release(cfg, n)]) for n in SIZES))


def test_a_report_never_changes_the_charge():
    # The server charges its own plan when the round is sent; what a reply says it spent
    # is the client's word (issue 27: a forged history crashed or stalled the accountant).
    ledger, cfg, state = _ledger()
    ledger.charge_sent(1, [0, 1, 2])
    sigma, q, steps = planned_release(cfg, SIZES[0])
    # Client 0 restarted and lost its record: its report holds less than the charge.
    # Client 1 reports more steps than planned; client 2 an older history the server never
    # saw. Neither lowers nor raises the server's count: an honest client trains exactly
    # the planned release (the same pure function, on the count the server holds).
    s1, q1, _ = planned_release(cfg, SIZES[1])
    s2, q2, n2 = planned_release(cfg, SIZES[2])
    ledger.settle(1, [
        _reply(0, sigma, q, 1, [(sigma, q, 1)]),
        _reply(1, s1, q1, 9, [(s1, q1, 9)]),
        {**_reply(2, s2, q2, n2, [(s2, q2, 3 * n2)]), "reason": "rejected: non-finite"},
    ])
    for pid, n in enumerate(SIZES):
        assert state.client_dp[pid].entries == [planned_release(cfg, n)]
    assert state.client_dp[0].entries == [(sigma, q, steps)]
    # The server's epsilon, not the 0.01 the clients claimed.
    assert state.client_eps[2] == pytest.approx(_eps(cfg, [(s2, q2, n2)]))
    assert ledger.fields()["epsilon_sample"] == max(state.client_eps.values()) > 0.01


def test_charges_accumulate_round_by_round_and_match_what_the_client_reports():
    ledger, cfg, state = _ledger()
    own = DPHistory()  # the client's own count, as local_train keeps it
    for rnd in (1, 2, 3):
        ledger.charge_sent(rnd, [0])
        sigma, q, steps = planned_release(cfg, SIZES[0])
        own.add(sigma, q, steps)
        ledger.settle(rnd, [_reply(0, sigma, q, steps, own.entries)])
    assert state.client_dp[0].entries == own.entries
    assert state.client_dp[0].steps == 3 * cfg.train.local_steps


def test_plan_hooks_add_their_releases_to_the_charge():
    ledger, cfg, state = _ledger()
    ledger.plan_hooks.append(lambda rnd, pid, n: [(2.0, 0.5, 3)])
    ledger.charge_sent(1, [2])
    assert state.client_dp[2].entries == [planned_release(cfg, SIZES[2]), (2.0, 0.5, 3)]


def test_stop_reason_projects_the_planned_release():
    # sigma 2.5, q = 1/2 (40 examples, batch 32), 5 steps a round: epsilon 2.33 after one
    # round, 3.27 after two; the budget of 3 stops client 2 before its second round.
    ledger, cfg, state = _ledger(["privacy.sample.noise_multiplier=2.5",
                                  "privacy.sample.target_epsilon=3"])
    assert ledger.stop_reason(1, [0, 2]) is None
    ledger.charge_sent(1, [2])
    ledger.settle(1, [])
    reason = ledger.stop_reason(2, [0, 2])
    assert reason is not None and "client 2's sample-level epsilon to 3.27" in reason


def test_the_noise_note_marks_every_epsilon_of_reproducible_mode():
    assert _ledger()[0].fields()["noise"] == SECRET_NOISE_NOTE
    assert _ledger(["privacy.reproducible_noise=true"])[0].fields()["noise"] == \
        SEEDED_NOISE_NOTE
    off = _ledger(["privacy.sample.enabled=false"])[0].fields()
    assert off["noise"] is None and off["epsilon_sample"] is None


def test_a_round_killed_after_it_was_sent_is_charged_on_resume(tmp_path):
    ledger, cfg, state = _ledger(folder=tmp_path)
    ledger.charge_sent(1, [0, 1])
    ledger.settle(1, [])
    # Round 1 completes (the checkpoint holds it); round 2 is sent, then the run dies.
    saved = ServerState(round=1, vector=state.vector, spec_hash="x", initial={},
                        client_dp={k: DPHistory(list(v.entries))
                                   for k, v in state.client_dp.items()})
    ledger.charge_sent(2, [1, 2])
    assert load_pending(tmp_path)["round"] == 2
    resumed, _, state2 = _ledger(state=_copy(saved), folder=tmp_path)
    p1, p2 = planned_release(cfg, SIZES[1]), planned_release(cfg, SIZES[2])
    assert state2.client_dp[1].entries == [(p1[0], p1[1], 2 * p1[2])]
    assert state2.client_dp[2].entries == [p2]
    assert state2.interrupted == [{"round": 2, "partition_ids": [1, 2]}]
    assert resumed.fields()["privacy_sample"]["interrupted_rounds_charged"] == \
        state2.interrupted
    # The resumed run sends round 2 again and dies again: two lost attempts, two charges.
    resumed.charge_sent(2, [1, 2])
    _, _, state3 = _ledger(state=saved, folder=tmp_path)
    assert state3.client_dp[2].entries == [(p2[0], p2[1], 2 * p2[2])]
    assert [i["round"] for i in state3.interrupted] == [2, 2]


def test_reproducible_noise_replays_the_killed_round_without_a_second_charge(tmp_path):
    sets = ["privacy.reproducible_noise=true"]
    ledger, cfg, state = _ledger(sets, folder=tmp_path)
    ledger.charge_sent(1, [0])
    saved = ServerState(round=0, vector=state.vector, spec_hash="x", initial={})
    _, _, state2 = _ledger(sets, state=saved, folder=tmp_path)
    assert state2.client_dp == {} and state2.interrupted == []


def test_a_completed_rounds_pending_file_is_not_charged_again(tmp_path):
    ledger, cfg, state = _ledger(folder=tmp_path)
    ledger.charge_sent(1, [0])
    ledger.settle(1, [])
    state.round = 1  # the checkpoint after round 1 holds the charge
    _, _, again = _ledger(state=state, folder=tmp_path)
    assert again.client_dp[0].entries == [planned_release(cfg, SIZES[0])]
    assert json.loads((tmp_path / PENDING_FILE).read_text())["round"] == 1


def test_without_sample_level_dp_reports_charge_nothing():
    ledger, cfg, state = _ledger(["privacy.sample.enabled=false", "privacy.user.enabled=true"])
    ledger.charge_sent(1, [0, 1])
    # What a non-DP client reports: sigma 0, no DP steps.
    ledger.settle(1, [_reply(0, 0.0, 0.0, 5, [(0.0, 0.0, 0)])])
    assert state.client_dp == {} and state.user_releases == 1
    assert ledger.fields()["epsilon_sample"] is None


def test_with_sample_level_dp_on_and_nothing_spent_yet_epsilon_is_null_never_zero():
    # An empty user-level Poisson cohort: DP-SGD is on and nobody has spent. The run-folder
    # contract (DESIGN.md) makes an epsilon null or a figure, never 0.
    ledger, _, state = _ledger(["privacy.user.enabled=true"])
    ledger.charge_sent(1, [])
    ledger.settle(1, [])
    assert state.client_eps == {} and ledger.fields()["epsilon_sample"] is None


def test_a_reported_history_of_no_steps_is_no_release():
    assert DPHistory.from_lists({"sigma": [0.0, 1.0], "q": [0.0, 0.5],
                                 "steps": [0, 3]}).entries == [(1.0, 0.5, 3)]


def test_a_pruning_client_is_charged_at_its_costliest_example_count():
    """Pruning shrinks the data a client trains on, which raises q and changes sigma: the
    charge made when the round is sent must be the costlier of the pruned and unpruned
    releases, so a pruned client that never replies is not under-charged."""
    from strategies.plugins import build_plugins

    sets = ["privacy.sample.noise_multiplier=1.0",
            'plugins=[{name="el2n_pruning", keep=0.25, allow_with_sample_dp=true}]']
    ledger, cfg, state = _ledger(sets)
    ledger.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    (planned,) = ledger.planned(1, 0)
    whole, pruned = planned_release(cfg, SIZES[0]), planned_release(cfg, 25)
    assert pruned[1] > whole[1]  # the pruned client samples each example more often

    def eps(event):
        return epsilon_of(DPHistory([event]), cfg.privacy.sample.delta, "rdp")

    assert planned == max(whole, pruned, key=eps) and eps(pruned) > eps(whole)
    ledger.charge_sent(1, [0])
    assert state.client_dp[0].entries == [pruned]

"""No lost spend: the server charges every client it asks to train, from the moment the
instruction is sent, with the same pure functions the client trains by; a reply can only
add to the charge; a round killed after it was sent is charged on resume (secret noise)."""

import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from torch.utils.data import TensorDataset

import strategies.server as server
from fedtune.config import load_config
from fedtune.privacy import DPHistory, epsilon_of, planned_release, poisson_sample_rate
from fedtune.privacy.plan import PrivacyPlan
from fedtune.privacy.randomness import SECRET_NOISE_NOTE, SEEDED_NOISE_NOTE
from fedtune.run.checkpoint import PENDING_FILE, ServerState, load_pending
from fedtune.wire.protocol import PartitionQuery, PartitionReply
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
    sizes = [len(p) for p in task.partitions]
    return PrivacyLedger(PrivacyPlan.of(cfg), sizes, state, folder), cfg, state


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
    ledger.settle(1)
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
    # Settling takes no reply at all (a forged one through a whole round: test_protocol's
    # test_forged_dp_histories_change_no_spend), so no report can lower or raise it.
    ledger, cfg, state = _ledger()
    assert list(inspect.signature(ledger.settle).parameters) == ["rnd"]
    ledger.charge_sent(1, [0, 1, 2])
    sigma, q, steps = planned_release(cfg, SIZES[0])
    s2, q2, n2 = planned_release(cfg, SIZES[2])
    ledger.settle(1)
    for pid, n in enumerate(SIZES):
        assert state.client_dp[pid].entries == [planned_release(cfg, n)]
    assert state.client_dp[0].entries == [(sigma, q, steps)]
    assert state.client_eps[2] == pytest.approx(_eps(cfg, [(s2, q2, n2)]))
    assert ledger.fields()["epsilon_sample"] == max(state.client_eps.values()) > 0


def test_charges_accumulate_round_by_round_and_match_what_the_client_reports():
    ledger, cfg, state = _ledger()
    own = DPHistory()  # the client's own count, as local_train keeps it
    for rnd in (1, 2, 3):
        ledger.charge_sent(rnd, [0])
        sigma, q, steps = planned_release(cfg, SIZES[0])
        own.add(sigma, q, steps)
        ledger.settle(rnd)
    assert state.client_dp[0].entries == own.entries
    assert state.client_dp[0].steps == 3 * cfg.train.local_steps


def test_plan_hooks_add_their_releases_to_the_charge():
    ledger, cfg, state = _ledger()
    ledger.releases.plan_hooks.append(lambda rnd, pid, n: [(2.0, 0.5, 3)])
    ledger.charge_sent(1, [2])
    assert state.client_dp[2].entries == [planned_release(cfg, SIZES[2]), (2.0, 0.5, 3)]


def test_stop_reason_projects_the_planned_release():
    # sigma 2.5, q = 1/2 (40 examples, batch 32), 5 steps a round: epsilon 2.33 after one
    # round, 3.27 after two; the budget of 3 stops client 2 before its second round.
    ledger, cfg, state = _ledger(["privacy.sample.noise_multiplier=2.5",
                                  "privacy.sample.target_epsilon=3"])
    assert ledger.stop_reason(1, [0, 2]) is None
    ledger.charge_sent(1, [2])
    ledger.settle(1)
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
    ledger.settle(1)
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


def test_reproducible_noise_still_charges_the_killed_round_on_resume(tmp_path):
    # A seeded replay may ask another cohort than the lost attempt (another roster at
    # discovery): the lost attempt's clients are charged as with secret noise, the safe side.
    sets = ["privacy.reproducible_noise=true"]
    ledger, cfg, state = _ledger(sets, folder=tmp_path)
    ledger.charge_sent(1, [0])
    saved = ServerState(round=0, vector=state.vector, spec_hash="x", initial={})
    _, _, state2 = _ledger(sets, state=saved, folder=tmp_path)
    assert state2.client_dp[0].entries == [planned_release(cfg, SIZES[0])]
    assert state2.interrupted == [{"round": 1, "partition_ids": [0]}]


def test_a_completed_rounds_pending_file_is_not_charged_again(tmp_path):
    ledger, cfg, state = _ledger(folder=tmp_path)
    ledger.charge_sent(1, [0])
    ledger.settle(1)
    state.round = 1  # the checkpoint after round 1 holds the charge
    _, _, again = _ledger(state=state, folder=tmp_path)
    assert again.client_dp[0].entries == [planned_release(cfg, SIZES[0])]
    assert json.loads((tmp_path / PENDING_FILE).read_text())["round"] == 1


def test_without_sample_level_dp_reports_charge_nothing():
    ledger, cfg, state = _ledger(["privacy.sample.enabled=false", "privacy.user.enabled=true"])
    ledger.charge_sent(1, [0, 1])
    # What a non-DP client reports: sigma 0, no DP steps.
    ledger.settle(1)
    assert state.client_dp == {} and state.user_releases == 1
    assert ledger.fields()["epsilon_sample"] is None


def test_with_sample_level_dp_on_and_nothing_spent_yet_epsilon_is_null_never_zero():
    # DP-SGD is on and nobody has spent. The run-folder contract (DESIGN.md) makes an
    # epsilon null or a figure, never 0.
    ledger, _, state = _ledger()
    assert state.client_eps == {} and ledger.fields()["epsilon_sample"] is None
    # An empty user-level Poisson cohort: null would say the secret cohort was empty, so
    # the release holds the bound of a client sampled in every round (FIX29J), a figure.
    ledger, _, state = _ledger(["privacy.user.enabled=true"])
    assert ledger.fields()["epsilon_sample"] is None  # no round sent yet
    ledger.charge_sent(1, [])
    ledger.settle(1)
    eps = ledger.fields()["epsilon_sample"]
    assert state.client_eps == {} and eps is not None and eps > 0


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
    ledger.releases.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    (planned,) = ledger.planned(1, 0)
    whole, pruned = planned_release(cfg, SIZES[0]), planned_release(cfg, 25)
    assert pruned[1] > whole[1]  # the pruned client samples each example more often

    def eps(event):
        return epsilon_of(DPHistory([event]), cfg.privacy.sample.delta, "rdp")

    assert planned == max(whole, pruned, key=eps) and eps(pruned) > eps(whole)
    ledger.charge_sent(1, [0])
    assert state.client_dp[0].entries == [pruned]


# -- kills in round 1, before any round completed ----------------------------------------
# run_server itself, in process, on a Grid whose clients never answer: the server is
# "killed" (an exception out of run_server: what kill -9 leaves on disk is what was written
# before it) at one point of round 1, then resumed. Every client's final epsilon must be at
# least the accountant's value for the instructions that went out.

KILL_SETS = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=2",
             "train.local_steps=1", "train.batch_size=8", "model.max_length=16",
             "tuning.prompt.length=2", "train.eval_max_examples=16",
             "train.round_timeout_s=0.05", "privacy.sample.accountant=rdp"]
NODES = {0: 100, 1: 101, 2: 102}


class Killed(Exception):
    """The server process dies here (kill -9): nothing after this point runs."""


class SilentGrid:
    """A Flower Grid whose nodes never reply; `kill_at` ("push": while the instructions go
    out, "pull": after they went out, waiting for replies) raises `error` there, once."""

    def __init__(self, kill_at=None, error=Killed):
        self.kill_at, self.error = kill_at, error
        self.sent: list[list[int]] = []  # the partitions each push went to

    def get_node_ids(self):
        return list(NODES.values())

    def push_messages(self, messages):
        messages = list(messages)
        if self.kill_at == "push":
            self.kill_at = None
            raise self.error("killed while the instructions go out")
        pid_of = {n: p for p, n in NODES.items()}
        self.sent.append([pid_of[m.metadata.dst_node_id] for m in messages])
        return [f"m{len(self.sent)}-{i}" for i in range(len(messages))]

    def pull_messages(self, ids):
        if self.kill_at == "pull":
            self.kill_at = None
            raise self.error("killed while waiting for replies")
        return []


def _serve(grid, cfg, out, resume=False):
    from fedtune.run.ledger import NoContributionError
    from strategies.discovery import Roster
    from strategies.server import run_server

    try:
        return run_server(grid, cfg, out, resume=resume, roster=Roster(nodes=dict(NODES)))
    except NoContributionError:  # nobody ever replies: the ledger is written all the same
        return None


def _planned_histories(cfg, sends):
    """The uninterrupted accounting of `sends` (the partitions of each instruction batch
    that went out): each client's planned release, once per instruction it was sent."""
    from fedtune.task.task import get_task

    sizes = [len(p) for p in get_task(cfg).partitions]
    expected: dict[int, DPHistory] = {}
    for pids in sends:
        for pid in pids:
            expected.setdefault(pid, DPHistory()).add(*planned_release(cfg, sizes[pid]))
    return expected


@pytest.mark.parametrize(("kill_at", "error"), [
    ("push", Killed),  # after the pending charge is on disk, while the instructions go out
    ("pull", Killed),  # after they went out, before any reply
    ("checkpoint", Killed),  # after the replies, before round 1's checkpoint
    ("pull", KeyboardInterrupt),  # Ctrl-C / an exception in the round: the same path
])
def test_a_run_killed_in_round_1_resumes_and_charges_every_release(
        tmp_path, monkeypatch, task_identity, kill_at, error):
    import strategies.server as server_app
    from fedtune.run.checkpoint import CHECKPOINT_FILE
    from fedtune.run.ledger import read_rounds

    cfg = load_config(None, KILL_SETS)
    out = tmp_path / "run"
    killed = SilentGrid(kill_at if kill_at != "checkpoint" else None, error)
    if kill_at == "checkpoint":
        real_save = server_app.save_checkpoint

        def save(folder, state):
            if state.round >= 1:
                raise Killed("killed before round 1's checkpoint")
            real_save(folder, state)

        monkeypatch.setattr(server_app, "save_checkpoint", save)
    with pytest.raises(error):
        _serve(killed, cfg, out)
    monkeypatch.undo()
    # The folder stays resumable: the round-0 checkpoint was written before round 1's
    # charges, and round 1's charges are on disk.
    assert (out / CHECKPOINT_FILE).exists() and load_pending(out)["round"] == 1
    attempted = [sorted(int(p) for p in a) for a in load_pending(out)["attempts"]]
    assert len(attempted) == 1 and len(attempted[0]) == cfg.train.clients_per_round

    resumed = SilentGrid()
    _serve(resumed, cfg, out, resume=True)
    rounds = read_rounds(out)
    # Calibrated noise spends the target over the 2 planned rounds; the killed attempt is
    # charged on top, so the budget stops the resumed run before round 2 (FIX29M).
    assert [r["round"] for r in rounds] == [1]
    # (Nobody replies here, so the run ends without summary.json.) Round 2 never went out.
    assert len(resumed.sent) == 1
    last = rounds[-1]["privacy_sample"]
    assert max(last["epsilon_by_client"].values()) <= 8.0
    assert last["interrupted_rounds_charged"] == [{"round": 1,
                                                   "partition_ids": attempted[0]}]
    # The killed attempt counts whether or not its instructions left (a push that died
    # half way may have delivered some): its charge was made before the push.
    expected = _planned_histories(cfg, attempted + resumed.sent)
    assert last["histories"] == {str(p): h.to_lists() for p, h in sorted(expected.items())}
    for pid, history in expected.items():
        truth = epsilon_of(history, cfg.privacy.sample.delta, "rdp")
        assert last["epsilon_by_client"][str(pid)] >= truth > 0


def test_the_round_0_checkpoint_is_on_disk_before_round_1_is_charged(
        tmp_path, monkeypatch, task_identity):
    """Order: checkpoint (round 0) -> pending charges -> instructions out."""
    import strategies.server as server_app
    from fedtune.run import checkpoint
    from fedtune.run.checkpoint import CHECKPOINT_FILE, load_checkpoint, privacy_fingerprint

    cfg = load_config(None, KILL_SETS)
    out = tmp_path / "run"
    seen = []
    real_save_pending = checkpoint.save_pending

    def save_pending(folder, pending):
        seen.append((out / CHECKPOINT_FILE).exists())
        real_save_pending(folder, pending)

    monkeypatch.setattr("strategies.privacy_ledger.save_pending", save_pending)
    with pytest.raises(Killed):
        _serve(SilentGrid("push"), cfg, out)
    assert seen == [True]
    state = load_checkpoint(out, server_app.get_task(cfg).spec.hash, privacy_fingerprint(cfg))
    assert state.round == 0 and state.client_dp == {} and state.record == {}


# -- the real thing: kill -9 in round 1, then --resume ---------------------------------------

E2E_SETS = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=2",
            "train.local_steps=20", "train.batch_size=8", "model.max_length=16",
            "tuning.prompt.length=2", "train.eval_max_examples=16",
            "privacy.sample.accountant=rdp"]


@pytest.mark.slow
@pytest.mark.long
def test_kill_9_in_round_1_then_resume_charges_every_release(tmp_path):
    """`fedtune run` killed (-9, the driver, Ray and every actor) once round 1's
    instructions are charged, before round 1 completes: `--resume` continues from the
    round-0 checkpoint and every client ends at or above the accountant's value for the
    instructions that went out (the lost attempt and the replayed rounds)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedtune.run.ledger import read_rounds

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fedtune.cli", "run", "experiments/quickstart.toml",
            "--out", str(out)]
    for item in E2E_SETS:
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not (out / PENDING_FILE).exists():
            assert proc.poll() is None, "the run ended before round 1 was sent"
            assert time.monotonic() < deadline, "round 1 was never sent"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_rounds(out) == [], "round 1 completed before the kill: not a round-1 kill"
    attempted = [sorted(int(p) for p in a) for a in load_pending(out)["attempts"]]
    assert len(attempted) == 1

    resumed = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", "--resume",
                              str(out)], cwd=root, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 0 of 2" in resumed.stdout
    cfg = load_config(out / "config.toml")
    rounds = read_rounds(out)
    # A client charged for the killed attempt and round 1 has spent the calibrated plan's
    # 2 rounds: if round 2 samples one, the budget stops the run before it (FIX29M).
    stopped = json.loads((out / "summary.json").read_text())["stopped_early"]
    assert [r["round"] for r in rounds] == ([1] if stopped else [1, 2])
    assert stopped is None or "over privacy.sample.target_epsilon" in stopped["reason"]
    last = rounds[-1]["privacy_sample"]
    assert max(last["epsilon_by_client"].values()) <= cfg.privacy.sample.target_epsilon
    assert last["interrupted_rounds_charged"] == [{"round": 1,
                                                   "partition_ids": attempted[0]}]
    asked = [[c["partition_id"] for c in r["per_client"] + r["rejected"] + r["failed"]]
             for r in rounds]
    expected = _planned_histories(cfg, attempted + asked)
    assert last["histories"] == {str(p): h.to_lists() for p, h in sorted(expected.items())}
    for pid, history in expected.items():
        truth = epsilon_of(history, cfg.privacy.sample.delta, "rdp")
        assert last["epsilon_by_client"][str(pid)] >= truth > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_at_rounds"] == [0]
    assert summary["epsilon_sample"] == max(last["epsilon_by_client"].values())


def test_a_resume_that_changes_a_mechanism_is_refused_before_anything_starts(
        tmp_path, task_identity, cli, monkeypatch):
    """Killed in round 1, then resumed with `split.local_loss_fraction` edited: one line
    naming it, before Ray starts (no simulation is launched)."""
    import fedtune.sim.driver

    cfg = load_config(None, KILL_SETS)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _serve(SilentGrid("pull"), cfg, out)
    config = (out / "config.toml").read_text()
    assert "\nlocal_loss_fraction = 0.0\n" in config
    (out / "config.toml").write_text(config.replace("\nlocal_loss_fraction = 0.0\n",
                                                    "\nlocal_loss_fraction = 0.5\n", 1))

    def no_simulation(*args, **kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(fedtune.sim.driver, "run_experiment", no_simulation)
    res = cli("run", "--resume", str(out))
    said = " ".join(res.output.split())
    assert res.code != 0 and "changed: split.local_loss_fraction (0.0 -> 0.5)" in said, said
    assert load_pending(out)["round"] == 1  # the charges stay for a resume that is allowed


# Moved here from tests/test_attack_spend.py (a review's reproducers, assertions kept): Attack
# (THREATS.md class 2): a deployment node with its own data file never releases more

class Trained(Exception):
    pass


def test_an_own_data_node_never_trains_on_another_count_than_it_reported(
        monkeypatch, tmp_path, task_identity):
    """The count a node reports at discovery is the one it trains on (the server charges by it)."""
    import clients.handlers as client_app
    import clients.node_data as node_data

    cfg = load_config(None, ["privacy.sample.noise_multiplier=1.0"])
    task = SimpleNamespace(backbone=SimpleNamespace(hash="h"), label_names=("a", "b"), cfg=cfg,
                           spec=SimpleNamespace(hash="s", unflatten=lambda v: {}))
    monkeypatch.setattr(client_app, "get_task", lambda cfg, bundle=None: task)
    rows = {"n": 1000}
    monkeypatch.setattr(node_data, "_load",
                        lambda file, task: TensorDataset(torch.zeros(rows["n"])))
    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "a", "label": 0}\n')
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "data-path": str(own)})
    query = Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                    dst_node_id=1)
    reply = client_app.handle_query(query, context, cfg=cfg)
    assert PartitionReply.from_record(reply.content, 4).own_examples == 1000

    # The operator's file changes between discovery and round 1 (rows removed).
    own.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    rows["n"] = 50
    trained_on = []

    def local_train(model, data, *args, **kwargs):
        trained_on.append(len(data))
        raise Trained

    monkeypatch.setattr(client_app, "local_train", local_train)
    monkeypatch.setattr(client_app, "worker_model",
                        lambda task, device: SimpleNamespace(load_trainable=lambda tensors: None))
    # The server sends back the count it fixed at discovery (and charges by).
    order = SimpleNamespace(vector=np.zeros(1, np.float32), server_round=1, lr=None,
                            clip_norm=None, dp_history=None, prune=None, domain=None,
                            withhold_metrics=False, examples=1000)
    monkeypatch.setattr(client_app.TrainInstruction, "from_record",
                        classmethod(lambda cls, content, spec: order))
    train = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1)
    answer = None
    try:
        answer = client_app.handle_train(train, context, cfg)
    except Trained:
        pass
    # The server charges planned_release(cfg, 1000) (q = 1/32); training on 50 rows
    # releases at q = 1/2 with the same sigma: far more epsilon than charged.
    assert trained_on in ([], [1000]), f"trained on {trained_on} rows after reporting 1000"
    # The refusal is an error reply, one line naming both counts.
    assert answer is not None and answer.has_error()
    assert "holds 50 training examples" in answer.error.reason
    assert "charges it for 1000" in answer.error.reason

    # An instruction without the server's count is refused too (own data file) ...
    order.examples = None
    answer = client_app.handle_train(train, context, cfg)
    assert trained_on == [] and answer.has_error() and "no example count" in answer.error.reason
    # ... and the count the server holds is trained on.
    order.examples = 50
    try:
        client_app.handle_train(train, context, cfg)
    except Trained:
        pass
    assert trained_on == [50]


def test_reproducible_mode_charges_a_lost_attempts_client_the_replay_leaves_out(tmp_path):
    """Seeded noise: a client asked in a killed attempt but not in its replay is still charged."""
    from fedtune.privacy.plan import PrivacyPlan
    from fedtune.run.checkpoint import ServerState
    from strategies.privacy_ledger import PrivacyLedger

    sets = ["data.num_clients=3", "train.clients_per_round=2", "train.rounds=4",
            "train.local_steps=5", "train.batch_size=32", "privacy.sample.accountant=rdp",
            "privacy.reproducible_noise=true"]
    cfg = load_config(None, sets)
    task = SimpleNamespace(partitions=[np.arange(n) for n in (100, 70, 40)])

    def fresh():
        return ServerState(round=0, vector=np.zeros(3, np.float32), spec_hash="x", initial={})

    sizes = [len(p) for p in task.partitions]
    PrivacyLedger(PrivacyPlan.of(cfg), sizes, fresh(), tmp_path).charge_sent(1, [0, 1])  # kill -9
    # The resume replays round 1 with another cohort (e.g. a node missed discovery this time,
    # so the seeded sample is drawn from another roster): client 1's upload went out once.
    state = fresh()
    resumed = PrivacyLedger(PrivacyPlan.of(cfg), sizes, state, tmp_path)
    resumed.charge_sent(1, [0, 2])
    resumed.settle(1)
    assert state.client_eps.get(1, 0.0) > 0.0, "client 1 released in the lost attempt, uncharged"


# Both levels on: under user-level DP the cohort is a secret Poisson draw, so what the
# release says of sample-level spend must not depend on who was drawn (FIX29J).
BOTH = ["data.num_clients=3", "train.clients_per_round=2", "privacy.user.enabled=true",
        "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50"]
COHORTS = {"a": [[0], [1], [], [0, 1]], "b": [[2], [2], [2], []], "c": [[], [], [], []]}


def _released_rounds(sets, cohorts, size_hook=None):
    """The released round records (and the curator's entries) of a ledger charged with
    `cohorts`, one list of partition ids per round."""
    from fedtune.run.curator_log import split_record

    ledger, cfg, state = _ledger(sets)
    if size_hook is not None:
        ledger.releases.size_hooks.append(size_hook)
    released, curator = [], []
    for rnd, cohort in enumerate(cohorts, start=1):
        ledger.charge_sent(rnd, cohort)
        ledger.settle(rnd)
        state.round = rnd
        fields = ledger.fields()
        record = {"round": rnd, "epsilon_sample": fields.pop("epsilon_sample"),
                  "epsilon_user": fields.pop("epsilon_user"), **fields}
        public, private = split_record(record, cfg)
        released.append(public)
        curator.append(private)
    return released, curator, state


@pytest.mark.parametrize("sets", [[], ["privacy.sample.noise_multiplier=2.5"]])
def test_both_levels_release_the_same_sample_epsilon_whoever_was_sampled(sets):
    releases = {name: _released_rounds([*BOTH, *sets], cohorts)[0]
                for name, cohorts in COHORTS.items()}
    assert releases["a"] == releases["b"] == releases["c"]
    # The summary's epsilon_sample and privacy sections are the last round's.
    assert all(r["epsilon_sample"] is not None for r in releases["c"])
    assert "every round" in releases["a"][-1]["privacy_sample"]["epsilon_sample_bounds"]


@pytest.mark.parametrize("hook", [None, lambda n: [n // 2]])
@pytest.mark.parametrize("sets", [[], ["privacy.sample.noise_multiplier=2.5"]])
def test_the_released_sample_epsilon_bounds_every_real_client(sets, hook):
    for cohorts in COHORTS.values():
        released, curator, state = _released_rounds([*BOTH, *sets], cohorts, hook)
        for public, private in zip(released, curator, strict=True):
            real = private["privacy_sample"]["epsilon_by_client"]  # the curator's log
            assert all(public["epsilon_sample"] >= eps for eps in real.values())
        assert set(real) == {str(p) for p in state.client_eps}
        # A client sampled in every round is what the bound is: tight without pruning.
        if hook is None and cohorts == COHORTS["a"]:
            every, _, state = _released_rounds([*BOTH, *sets], [[0, 1, 2]] * 4)
            assert released[-1]["epsilon_sample"] == pytest.approx(
                max(state.client_eps.values()), rel=1e-9)


def test_the_bound_counts_an_interrupted_attempt_whoever_was_in_it(tmp_path):
    def resumed(cohort):
        folder = tmp_path / f"run{len(cohort)}"
        folder.mkdir()
        ledger, _, state = _ledger([*BOTH, "privacy.sample.noise_multiplier=2.5"],
                                   folder=folder)
        saved = _copy(state)  # the checkpoint before round 1
        ledger.charge_sent(1, cohort)  # killed in round 1: resumed, round 1 is charged
        resumed, _, state = _ledger([*BOTH, "privacy.sample.noise_multiplier=2.5"],
                                    state=saved, folder=folder)
        resumed.charge_sent(1, cohort)
        resumed.settle(1)
        eps = resumed.fields()["epsilon_sample"]
        assert all(eps >= e for e in state.client_eps.values())
        return eps

    assert resumed([]) == resumed([2]) == resumed([0, 1])


def test_a_budget_stop_under_user_dp_names_no_client_and_comes_whoever_was_sampled():
    """With a secret cohort the stop follows the released bound: the same round and the same
    text whoever the cohorts were (a client's own budget would say it was sampled), and the
    released epsilon never passes the target."""
    sets = [*BOTH, "privacy.sample.noise_multiplier=2.5", "privacy.sample.target_epsilon=3"]
    stops = []
    for cohorts in ([2], [1], []):
        ledger, _, _ = _ledger(sets)
        rnd = 1
        while (stop := ledger.stop(rnd, cohorts)) is None:
            ledger.charge_sent(rnd, cohorts)
            ledger.settle(rnd)
            assert ledger.fields()["epsilon_sample"] <= 3
            rnd += 1
        stops.append((rnd, stop.release, stop.curator))
        assert stop.release == stop.curator
        assert "client" not in stop.release.replace("a client sampled in every round", "")
        assert "privacy.sample.target_epsilon=3" in stop.release
    assert stops[0] == stops[1] == stops[2]
    # Client 2 alone would run out in round 2; the bound (its worst client) stops there too.
    assert stops[0][0] == 2


def test_without_user_dp_the_release_keeps_the_charged_maximum_and_names_the_client():
    ledger, cfg, state = _ledger(["privacy.sample.noise_multiplier=2.5",
                                  "privacy.sample.target_epsilon=3"])
    assert ledger.fields()["epsilon_sample"] is None  # nobody charged yet
    assert "epsilon_sample_bounds" not in ledger.fields()["privacy_sample"]
    ledger.charge_sent(1, [2])
    ledger.settle(1)
    assert ledger.fields()["epsilon_sample"] == max(state.client_eps.values())
    stop = ledger.stop(2, [0, 2])
    assert stop.release == stop.curator == ledger.stop_reason(2, [0, 2])
    assert "client 2's sample-level epsilon to 3.27" in stop.release

# ATTACK29C: a run killed after round 3 was sent, resumed, then stopped by the budget before
# round 3 runs again: the summary must release the interrupted attempt's charge too.
RESUME_STOP_SETS = [*BOTH, "privacy.sample.noise_multiplier=2.5",
                    "privacy.sample.target_epsilon=4.3"]


def _released_summary(cfg, history, state, monkeypatch, spent=None) -> dict:
    kind = SimpleNamespace(summary_fields=lambda *a: {}, baseline=lambda *a: {})
    monkeypatch.setattr(server, "task_kind", lambda name: kind)
    monkeypatch.setattr(server, "validation_examples", lambda task, cfg: 0)
    monkeypatch.setattr(server, "pruning_record", lambda backbone, length: {})
    task = SimpleNamespace(spec=SimpleNamespace(size=4), backbone=SimpleNamespace(num_params=9))
    return server._summary(history, state, task, cfg, {}, spent).to_json()


def test_a_budget_stop_right_after_a_resume_releases_the_interrupted_attempts_spend(
        tmp_path, monkeypatch):
    """summary.json's epsilon_sample (both DP levels, a secret cohort) is never below a
    charged client's epsilon, an interrupted attempt's charge included."""
    ledger, cfg, state = _ledger(RESUME_STOP_SETS, folder=tmp_path)
    history = []
    for rnd in (1, 2):  # client 2 (q 1/2) in every round: the bound is exactly its epsilon
        assert ledger.stop(rnd, [0, 1, 2]) is None
        ledger.charge_sent(rnd, [0, 1, 2])
        ledger.settle(rnd)
        state.round = rnd
        fields = ledger.fields()
        history.append({"round": rnd, "epsilon_sample": fields.pop("epsilon_sample"),
                        "epsilon_user": fields.pop("epsilon_user"), **fields})
    saved = _copy(state)  # the checkpoint after round 2
    saved.round = 2
    assert ledger.stop(3, [2]) is None  # the bound through round 3 (4.02) is within 4.3
    ledger.charge_sent(3, [2])  # round 3 sent, then the run is killed before it completes
    # The resumed ledger charges the interrupted attempt.
    resumed, _, state = _ledger(RESUME_STOP_SETS, state=saved, folder=tmp_path)
    stop = resumed.stop(3, [0])
    assert stop is not None, "this config's budget stops the resumed run before round 3"
    charged = max(state.client_eps.values())  # client 2: rounds 1, 2 and the attempt at 3
    released = _released_summary(cfg, history, state, monkeypatch,
                                  resumed.spent())["epsilon_sample"]
    assert released >= charged, (f"summary epsilon_sample {released:.4f} below client 2's "
                                 f"charged {charged:.4f} (the interrupted attempt left out)")



# Moved here from tests/test_attack29c_*.py (ATTACK29C 6 and 7, assertions kept): the
# example counts a node reports at discovery, on a resume and before round 1.
def test_the_bound_stays_above_every_charged_client_when_counts_change_on_resume():
    """The released bound is never below a charged client's epsilon and computing it does
    not crash a resumed run, whatever example counts the nodes report at re-discovery."""
    ledger, _, state = _ledger([*BOTH, "privacy.sample.noise_multiplier=2.5"])
    ledger.use_example_counts({0: 100, 1: 70, 2: 40})  # discovery of the first run
    for rnd in (1, 2):
        ledger.charge_sent(rnd, [2])
        ledger.settle(rnd)
        state.round = rnd
    charged = max(state.client_eps.values())
    # Killed after round 2; on resume the same checkpoint, but every node now reports a
    # bigger data file (a node that grew its file, or lies at discovery).
    resumed = PrivacyLedger(ledger.plan, ledger.partition_sizes, state)
    refused = resumed.use_example_counts({0: 4000, 1: 4000, 2: 4000})
    resumed.charge_sent(3, [])
    resumed.settle(3)
    state.round = 3
    eps = resumed.fields()["epsilon_sample"]  # integ: RuntimeError "... a ledger bug"
    assert eps >= charged
    assert np.isfinite(eps)
    # Each changed count is refused for its node, naming both counts; the first ones stay.
    assert sorted(refused) == [0, 1, 2]
    assert "reports 4000 examples" in refused[2] and "fixed 40" in refused[2]
    assert state.examples == {0: 100, 1: 70, 2: 40}


ONE_CLAIM_SETS = [*BOTH, "privacy.sample.noise_multiplier=2.5",
                  "privacy.sample.target_epsilon=4"]


def test_one_nodes_discovery_claim_cannot_stop_the_run_before_any_round():
    """A node that claims 1 example at discovery (the wire allows 1..MAX_NODE_EXAMPLES) and
    is never sampled does not end every client's training before round 1 (its claim is
    refused at discovery, or it is left out of the population, with a clear reason)."""
    honest, _, _ = _ledger(ONE_CLAIM_SETS)
    assert honest.use_example_counts({0: 100, 1: 70, 2: 40}) == {}
    assert honest.stop(1, [0]) is None  # the honest population trains round 1
    hostile, _, state = _ledger(ONE_CLAIM_SETS)
    refused = hostile.use_example_counts({0: 100, 1: 70, 2: 1})  # node 2 claims one example
    stop = hostile.stop(1, [0])  # round 1's secret cohort holds client 0 only
    assert stop is None, f"node 2's claim stops the run before round 1: {stop.release}"
    assert list(refused) == [2] and "privacy.sample.target_epsilon=4" in refused[2]
    assert 2 not in state.examples  # not admitted: outside the bound


def test_a_run_killed_before_its_first_checkpoint_keeps_the_counts_its_charges_used(tmp_path):
    """The round-0 checkpoint is written before discovery: the counts a killed round 1 was
    charged by are in its pending file, so the resume refuses a node reporting another."""
    sets = [*BOTH, "privacy.sample.noise_multiplier=2.5"]
    ledger, _, state = _ledger(sets, folder=tmp_path)
    saved = _copy(state)  # the round-0 checkpoint: no counts yet
    ledger.use_example_counts({0: 100, 1: 70, 2: 40})
    ledger.charge_sent(1, [2])  # killed in round 1, before its checkpoint
    assert load_pending(tmp_path)["examples"] == {"0": 100, "1": 70, "2": 40}
    resumed, _, state = _ledger(sets, state=saved, folder=tmp_path)
    assert state.examples == {0: 100, 1: 70, 2: 40}
    assert list(resumed.use_example_counts({0: 100, 1: 70, 2: 4000})) == [2]
    resumed.charge_sent(1, [0])
    resumed.settle(1)
    assert resumed.fields()["epsilon_sample"] >= max(state.client_eps.values())


def test_a_claim_within_budget_and_calibrated_noise_are_admitted():
    """The claim check refuses only what could never train the planned rounds: a claim of
    the partition's own size, a claim within the target, and any claim under calibrated
    noise (calibrated per count to stay within the target) are admitted."""
    given, _, state = _ledger(ONE_CLAIM_SETS)
    assert given.use_example_counts({0: 100, 1: 5000, 2: 40}) == {}
    assert state.examples == {0: 100, 1: 5000, 2: 40}
    calibrated, _, state = _ledger(BOTH)
    assert calibrated.use_example_counts({0: 100, 1: 70, 2: 1}) == {}
    # Without a secret cohort the same claim would stop the run when sampled: refused too.
    alone, _, state = _ledger(["privacy.sample.noise_multiplier=2.5",
                               "privacy.sample.target_epsilon=4"])
    refused = alone.use_example_counts({0: 100, 1: 70, 2: 1})
    assert list(refused) == [2] and "claims 1 examples" in refused[2]
    assert alone.stop(1, [0, 1]) is None

"""Checkpoint and ledger repair: what `fedtune run --resume` relies on after a kill, and the
privacy parameters a resume must not change."""

import json
import random

import numpy as np
import pytest
import torch

from fedtune.checkpoint import (
    PENDING_FILE,
    CheckpointError,
    ServerState,
    load_checkpoint,
    load_pending,
    privacy_fingerprint,
    save_checkpoint,
    save_pending,
)
from fedtune.config import load_config
from fedtune.ledger import Ledger, LedgerError
from fedtune.privacy import DPHistory


def _state(rnd=2):
    return ServerState(round=rnd, vector=np.arange(5, dtype=np.float32), spec_hash="abc",
                       initial={"accuracy": 0.5, "loss": 0.7}, client_eps={3: 1.5},
                       client_dp={3: DPHistory([(1.1, 0.1, 20)])},
                       record={"round": rnd, "accuracy": 0.9}, elapsed_s=12.5,
                       interrupted=[{"round": 1, "partition_ids": [3]}])


def test_round_trip_restores_state_and_every_rng(tmp_path):
    save_checkpoint(tmp_path, _state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = load_checkpoint(tmp_path, "abc")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    np.testing.assert_array_equal(state.vector, np.arange(5, dtype=np.float32))
    assert state.client_eps == {3: 1.5} and state.client_dp[3].entries == [(1.1, 0.1, 20)]
    assert state.round == 2 and state.record["accuracy"] == 0.9 and state.elapsed_s == 12.5
    assert state.interrupted == [{"round": 1, "partition_ids": [3]}]
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="stopped before it started"):
        load_checkpoint(tmp_path, "abc")
    save_pending(tmp_path, {"round": 1, "attempts": [{"0": [[1.0, 0.5, 2]]}]})
    with pytest.raises(CheckpointError, match="DP charges in privacy_pending.json: start "
                                              "the run again in a new --out folder"):
        load_checkpoint(tmp_path, "abc")
    save_checkpoint(tmp_path, _state())
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_checkpoint(tmp_path, "other")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable fedtune checkpoint"):
        load_checkpoint(tmp_path, "abc")


def test_ledger_restore_appends_the_checkpointed_round_and_drops_a_torn_line(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append_round({"round": 1})
    with ledger.rounds_path.open("a") as fh:
        fh.write('{"round": 2, "accur')  # killed mid-write
    ledger.restore(2, {"round": 2, "accuracy": 0.9})
    assert ledger.rounds() == [{"round": 1}, {"round": 2, "accuracy": 0.9}]
    ledger.restore(2, {"round": 2, "accuracy": 0.9})  # idempotent
    assert len(ledger.rounds()) == 2


def test_ledger_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    ledger = Ledger(tmp_path)
    for rnd in (1, 2, 3):
        ledger.append_round({"round": rnd})
    with pytest.raises(LedgerError, match=r"holds rounds \[1, 2, 3\].*checkpoint is at round 1"):
        ledger.restore(1, {"round": 1})
    ledger.rounds_path.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(LedgerError, match="rounds.jsonl:2 is not JSON"):
        ledger.restore(3, {"round": 3})
    assert json.loads(ledger.rounds_path.read_text().splitlines()[0]) == {"round": 1}


def test_resume_refuses_changed_privacy_parameters_naming_them(tmp_path):
    # Editing train.rounds recalibrates sigma; re-accounting the past releases at the new
    # sigma under-reported epsilon by 11 %. A resume must refuse it instead.
    cfg = load_config(None, ["train.rounds=3"])
    state = _state()
    state.privacy = privacy_fingerprint(cfg)
    save_checkpoint(tmp_path, state)
    assert load_checkpoint(tmp_path, "abc", privacy_fingerprint(cfg)).privacy == state.privacy
    edited = load_config(None, ["train.rounds=5", "privacy.sample.target_epsilon=4",
                                "train.lr=0.5"])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, "abc", privacy_fingerprint(edited))
    message = str(err.value)
    assert "\n" not in message and "refusing to resume" in message
    assert "train.rounds (3 -> 5)" in message
    assert "privacy.sample.target_epsilon (8.0 -> 4.0)" in message
    assert "train.lr" not in message  # not a privacy parameter


@pytest.mark.parametrize("key", ["train.batch_size=16", "train.local_steps=3",
                                 "train.clients_per_round=2", "train.local_epochs=1",
                                 "data.num_clients=10", "data.alpha=0.1",
                                 "privacy.user.enabled=true", "privacy.reproducible_noise=true",
                                 "split.smashed_dp.enabled=true"])
def test_every_privacy_parameter_is_in_the_fingerprint(key):
    assert privacy_fingerprint(load_config(None, [key])) != privacy_fingerprint(
        load_config(None, []))


def test_the_seed_is_a_privacy_parameter_it_decides_the_partitions():
    # Another seed deals other examples to each client (and, in reproducible-noise mode,
    # other noise): the clients' histories would no longer describe their data.
    assert privacy_fingerprint(load_config(None, ["seed=1"])) != \
        privacy_fingerprint(load_config(None, ["seed=2"]))
    assert privacy_fingerprint(load_config(None, ["train.lr=0.1", "model.max_length=32"])) \
        == privacy_fingerprint(load_config(None, []))


def test_a_checkpoint_without_privacy_parameters_cannot_be_checked(tmp_path):
    save_checkpoint(tmp_path, _state())  # privacy left empty, as nothing recorded it
    with pytest.raises(CheckpointError, match="records no privacy parameters"):
        load_checkpoint(tmp_path, "abc", privacy_fingerprint(load_config(None, [])))


def test_pending_charges_round_trip(tmp_path):
    assert load_pending(tmp_path) is None
    save_pending(tmp_path, {"round": 3, "charges": {"1": [[1.1, 0.25, 10]]}})
    assert load_pending(tmp_path) == {"round": 3, "charges": {"1": [[1.1, 0.25, 10]]}}
    (tmp_path / PENDING_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="privacy_pending.json is not readable JSON"):
        load_pending(tmp_path)


def test_ledger_restore_at_round_0_adds_no_record(tmp_path):
    # The checkpoint written before round 1 (so a run killed in round 1 stays resumable)
    # has no round record: restoring at it leaves an empty ledger, a torn line dropped.
    Ledger(tmp_path).restore(0, {})
    assert not (tmp_path / "rounds.jsonl").exists()
    (tmp_path / "rounds.jsonl").write_text('{"round": 1, "acc')
    Ledger(tmp_path).restore(0, {})
    assert (tmp_path / "rounds.jsonl").read_text() == ""
    (tmp_path / "rounds.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(LedgerError, match="does not match the checkpoint"):
        Ledger(tmp_path).restore(0, {})

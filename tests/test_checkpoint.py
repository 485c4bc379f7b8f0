"""Checkpoint and ledger repair: what `fedtune run --resume` relies on after a kill."""

import json
import random

import numpy as np
import pytest
import torch

from fedtune.checkpoint import CheckpointError, ServerState, load_checkpoint, save_checkpoint
from fedtune.ledger import Ledger, LedgerError
from fedtune.privacy import DPHistory


def _state(rnd=2):
    return ServerState(round=rnd, vector=np.arange(5, dtype=np.float32), spec_hash="abc",
                       initial={"accuracy": 0.5, "loss": 0.7}, client_eps={3: 1.5},
                       client_dp={3: DPHistory([(1.1, 0.1, 20)])},
                       record={"round": rnd, "accuracy": 0.9}, elapsed_s=12.5)


def test_round_trip_restores_state_and_every_rng(tmp_path):
    save_checkpoint(tmp_path, _state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = load_checkpoint(tmp_path, "abc")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    np.testing.assert_array_equal(state.vector, np.arange(5, dtype=np.float32))
    assert state.client_eps == {3: 1.5} and state.client_dp[3].entries == [(1.1, 0.1, 20)]
    assert state.round == 2 and state.record["accuracy"] == 0.9 and state.elapsed_s == 12.5
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no round finished"):
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

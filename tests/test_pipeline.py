"""The round flows one way (issue 28): each step returns its value and figures, a wrapper
uses the inner strategy's public methods only, and the records are typed."""

import copy
from uuid import uuid4

import numpy as np
import pytest
from conftest import FakeGrid
from flwr.app import Message
from wire import reply, spec_of, stray_message

from fedtune.config import UserDPConfig
from fedtune.run.records import RoundRecord, Summary
from fedtune.wire.protocol import TrainReply, TrainReport
from strategies import pipeline
from strategies.delta_fedavg import DeltaFedAvg
from strategies.user_dp import UserLevelDP

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = spec_of(6)


def _fedavg(cohort=3):
    strategy = DeltaFedAvg(SPEC, cohort, seed=0)
    strategy.roster = {pid: 100 + pid for pid in range(cohort)}
    return strategy


def _lean(msg, delta):
    """A reply that withholds every figure it may (what the wrapper asked)."""
    built = TrainReply.build(np.asarray(delta, np.float32), SPEC.hash, TrainReport(steps=2))
    return Message(content=built.to_record(), reply_to=msg)


def _state(strategy):
    return {k: copy.deepcopy(v) for k, v in vars(strategy).items()}


def test_the_user_level_wrapper_leaves_the_inner_strategy_as_it_was():
    # main: the wrapper wrote inner.clip_norm and inner.withhold_metrics, and a round
    # filled inner.outcome and inner.global_vector.
    inner = _fedavg()
    before = _state(inner)
    rounds = UserLevelDP(inner, UserDPConfig(enabled=True, clipping="client", clip_norm=1.0,
                                             withhold_metrics=True), 0.5, 3, 7)
    sent = rounds.configure_train(1, np.zeros(6, np.float32), 0.1, rounds.sample(1, None))
    result = rounds.aggregate_train(sent, [_lean(m, np.full(6, 0.1)) for m in sent.messages])
    assert result.vector is not None and len(result.outcome.aggregated_norms) == 3
    after = _state(inner)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert repr(after[key]) == repr(value), key


def test_two_rounds_in_flight_are_screened_each_against_what_it_sent():
    # A round's state travels in its `Sent`: configuring round 2 does not change how
    # round 1's replies are screened (main kept one `_asked` and `global_vector`).
    strategy = _fedavg()
    first = strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0, 1])
    second = strategy.configure_train(2, np.ones(6, np.float32), 0.1, [2])
    result = strategy.aggregate_train(first, [reply(m, np.full(6, 2.0), SPEC)
                                              for m in first.messages])
    np.testing.assert_array_equal(result.vector, np.full(6, 2.0, np.float32))
    assert [c["partition_id"] for c in result.outcome.accepted] == [0, 1]
    assert result.outcome.unsolicited == [] and result.outcome.sampled == first.sampled
    late = strategy.aggregate_train(second, [reply(first.messages[0], np.ones(6), SPEC)])
    assert late.vector is None and len(late.outcome.unsolicited) == 1
    assert [f["partition_id"] for f in late.outcome.failed] == [2]


def test_the_user_level_release_is_its_steps_composed():
    inner = _fedavg(4)
    rounds = UserLevelDP(inner, UserDPConfig(enabled=True, clip_norm=1.0), 0.0, 4)
    base = np.full(6, 0.25, np.float32)
    sent = rounds.configure_train(1, base, 0.1, rounds.sample(1, FakeGrid([])))
    deltas = [np.full(6, s) for s in (0.01, 0.2, 3.0, 50.0)]
    result = rounds.aggregate_train(sent, [reply(m, d, SPEC)
                                           for m, d in zip(sent.messages, deltas, strict=True)])
    screened = inner.screen(sent, [reply(m, d, SPEC)
                                   for m, d in zip(sent.messages, deltas, strict=True)])
    clipped = pipeline.clip(screened.accepted, 1.0, client_side=False)
    assert not clipped.refused
    summed, norms = pipeline.total(pipeline.weight(clipped), 6)
    expected = pipeline.release(np.asarray(base, np.float64), summed, 4, np.zeros(6))
    np.testing.assert_array_equal(result.vector, expected)  # bit for bit
    assert result.outcome.aggregated_norms == norms
    assert max(norms) <= 1.0


def test_client_side_clipping_refuses_by_returning_not_by_writing():
    accepted = [pipeline.Accepted(0, 10, np.full(4, 0.1, np.float32), {"weight": 1.0},
                                  TrainReport(steps=1)),
                pipeline.Accepted(1, 11, np.full(4, 9.0, np.float32),
                                  {"steps": 2, "delta_norm": 18.0, "weight": 1.0},
                                  TrainReport(steps=2))]
    clipped = pipeline.clip(accepted, 1.0, client_side=True)
    assert [item.partition_id for item, _ in clipped.kept] == [0]
    ((item, reason),) = clipped.refused
    assert item.partition_id == 1 and "exceeds privacy.user.clip_norm=1.0" in reason
    screened = pipeline.Screened(accepted)
    after = screened.refuse(1, clipped.refused)
    assert [a.partition_id for a in after.accepted] == [0]
    assert after.rejected == [{"steps": 2, "reason": reason}]
    # The refused reply's typed report goes with it: its work still counts in the totals.
    assert after.rejected_reports == [pipeline.ClientReport(1, TrainReport(steps=2))]
    assert len(screened.accepted) == 2 and screened.rejected == []  # the input unchanged


def test_the_records_write_the_contract_keys_in_order():
    record = RoundRecord(
        round=1, val_accuracy=0.5, val_loss=0.7, epsilon_sample=None, epsilon_user=None,
        delta=None, clients=2, bytes_up=8, bytes_down=8, client_flops=1.0, wall_s=0.1,
        lr=0.1, train_loss=None, sampled=2, no_contribution=False, rejected=[], failed=[],
        per_client=[], forward_layers_skipped=0,
        privacy={"noise": None, "privacy_sample": None, "privacy_user": None},
        privacy_in_clear={}, notes={"epsilon_sample_note": None},
        aggregation={"rule": "mean"}, extras={"pruning": {}})
    keys = list(record.to_json())
    contract = ["round", "val_accuracy", "val_loss", "epsilon_sample", "epsilon_user",
                "delta", "clients", "bytes_up", "bytes_down", "client_flops", "wall_s"]
    assert keys[:len(contract)] == contract
    assert "noise" in keys and "unsolicited" not in keys and "refused_claims" not in keys
    assert keys[-3:] == ["privacy_in_clear", "epsilon_sample_note", "pruning"]
    summary = Summary(
        accuracy={"final_accuracy": 0.9, "best_val_accuracy": 0.8, "best_round": 1},
        initial_evaluated="x", epsilon_sample=None, epsilon_user=None, delta=None, notes={},
        noise=None, privacy_sample=None, privacy_user=None, rounds=1, stopped_early=None,
        total_bytes_up=8, total_bytes_down=8, total_client_flops=1.0, trainable_params=6,
        backbone_params=10, method="bitfit", resumed_at_rounds=[], wall_s=1.0)
    assert {"final_accuracy", "best_val_accuracy", "best_round", "epsilon_sample",
            "epsilon_user", "delta", "noise", "rounds", "total_bytes_up", "total_bytes_down",
            "trainable_params", "backbone_params", "method", "wall_s"} <= set(summary.to_json())


# Moved here from tests/test_attack28_pipeline.py (a review's reproducers, assertions kept):
# ATTACK28 (issue 28, target 1): the new round pipeline as a malicious client sees it.

pytestmark = pytest.mark.usefixtures("task_identity")

def _pushed(sent):
    """Give each message the id a Grid's push gives it (Flower's InMemoryGrid does this)."""
    for m in sent.messages:
        m.metadata.__dict__["_message_id"] = str(uuid4())
    return sent


def test_a_late_reply_to_an_earlier_round_never_reaches_this_rounds_aggregate():
    """A reply to round 1's message never enters round 2, even from a node round 2 asked."""
    strategy = _fedavg()
    first = _pushed(strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0, 1]))
    second = _pushed(strategy.configure_train(2, np.ones(6, np.float32), 0.1, [0]))
    late = reply(first.messages[0], np.full(6, 5.0), SPEC)  # node 100, computed on round 1
    result = strategy.aggregate_train(second, [late])
    assert result.outcome.accepted == [], "round 1's reply was averaged into round 2"
    assert result.vector is None


def test_a_reply_to_a_message_never_sent_never_reaches_the_aggregate():
    """A reply whose reply_to names no message of this round is never accepted."""
    strategy = _fedavg()
    sent = _pushed(strategy.configure_train(1, np.zeros(6, np.float32), 0.1, [0]))
    forged = stray_message(100)
    forged.metadata.__dict__["_message_id"] = str(uuid4())
    result = strategy.aggregate_train(sent, [reply(forged, np.full(6, 5.0), SPEC)])
    assert result.outcome.accepted == [], "a reply to an unsent message was averaged in"

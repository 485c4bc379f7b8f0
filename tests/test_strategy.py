"""DeltaFedAvg: weighted aggregation of deltas, rejection of bad replies, byte counting."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import Array, ArrayRecord, Error, Message
from wire import honest_metrics, raw_reply, reply

from fedtune.wire.delta import DeltaSpec
from fedtune.wire.protocol import TrainInstruction
from strategies import DeltaFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")


SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})


def _strategy(cohort, nodes=(11, 12, 13, 14), seed=0):
    strategy = DeltaFedAvg(SPEC, cohort, seed=seed)
    strategy.roster = dict(enumerate(nodes))
    return strategy


def _configure(strategy, global_vec, rnd=1):
    cohort = strategy.sample(rnd, FakeGrid(list(strategy.roster.values())))
    return strategy.configure_train(rnd, np.asarray(global_vec, np.float32), 0.1, cohort)


def _result(round_):
    return round_.vector, round_.outcome


def test_cohort_sampling_is_seeded_and_sized():
    nodes = list(range(100, 120))
    s1, s2 = _strategy(2, nodes, seed=3), _strategy(2, nodes, seed=3)
    a = [s1.sample(r, FakeGrid(nodes)) for r in range(1, 6)]
    b = [s2.sample(r, FakeGrid(nodes)) for r in range(1, 6)]
    assert a == b and all(len(set(c)) == 2 for c in a)
    assert len({tuple(c) for c in a}) > 1  # cohorts change between rounds


def test_instructions_carry_the_round_through_the_protocol():
    strategy = _strategy(2)
    sent = _configure(strategy, np.ones(6))
    msgs = sent.messages
    order = TrainInstruction.from_record(msgs[0].content, SPEC)
    assert (order.server_round, order.lr, order.clip_norm) == (1, 0.1, None)
    np.testing.assert_array_equal(order.vector, np.ones(6, np.float32))
    sampled = sent.sampled
    assert [s["node"] for s in sampled] == [m.metadata.dst_node_id for m in msgs]
    assert all(strategy.roster[s["partition_id"]] == s["node"] for s in sampled)


def test_weighted_mean_delta_is_added_to_global():
    strategy = _strategy(2)
    sent = _configure(strategy, np.ones(6))
    msgs = sent.messages
    assert len(msgs) == 2
    # The weights are the server's example counts (partition sizes, set at discovery).
    first, second = (s["partition_id"] for s in sent.sampled)
    strategy.examples = {first: 30, second: 10}
    replies = [reply(msgs[0], np.full(6, 1.0), SPEC, n=30),
               reply(msgs[1], np.full(6, 4.0), SPEC, n=10)]
    new, out = _result(strategy.aggregate_train(sent, replies))
    assert np.allclose(new, 1.0 + (30 * 1.0 + 10 * 4.0) / 40)
    assert sorted(a["num_examples"] for a in out.accepted) == [10, 30]
    assert out.no_contribution is False


def test_bytes_are_counted_from_the_messages():
    strategy = _strategy(3)
    sent = _configure(strategy, np.zeros(6))
    msgs = sent.messages
    assert sent.bytes_down == 3 * 6 * 4
    out = strategy.aggregate_train(sent, [reply(m, np.zeros(6), SPEC, n=5)
                                          for m in msgs]).outcome
    assert out.bytes_up == 3 * 6 * 4
    assert all(c["bytes_up"] == 6 * 4 for c in out.accepted)


def test_bad_replies_are_rejected_and_recorded_not_aggregated():
    strategy = _strategy(4)
    sent = _configure(strategy, np.zeros(6))
    msgs = sent.messages
    nan = np.zeros(6)
    nan[2] = np.nan
    replies = [
        reply(msgs[0], np.full(6, 2.0), SPEC),                             # good
        raw_reply(msgs[1], nan, SPEC.hash, honest_metrics()),              # non-finite
        raw_reply(msgs[2], np.zeros(6), "other", honest_metrics()),        # wrong model
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[3]),
    ]
    new, out = _result(strategy.aggregate_train(sent, replies))
    assert np.allclose(new, 2.0)
    assert len(out.accepted) == 1 and len(out.rejected) == 2 and len(out.failed) == 1
    reasons = " ".join(r["reason"] for r in out.rejected)
    assert "non-finite" in reasons and "spec hash" in reasons
    assert out.failed[0]["reason"] == "client crashed"
    # A rejected delta's validated report stays on the ledger (it trained, it spent).
    assert all(r["num_examples"] == 10 and isinstance(r["partition_id"], int)
               for r in out.rejected)


def test_sampled_clients_that_never_reply_are_recorded_as_failed():
    strategy = _strategy(3, nodes=(11, 12, 13))
    sent = _configure(strategy, np.zeros(6))
    msgs = sent.messages
    new, out = _result(strategy.aggregate_train(sent, [reply(msgs[0], np.ones(6), SPEC, n=5)]))
    assert np.allclose(new, 1.0)
    silent = {m.metadata.dst_node_id for m in msgs[1:]}
    assert {f["node"] for f in out.failed} == silent
    assert all("no reply within train.round_timeout_s" == f["reason"]
               for f in out.failed)


def test_smuggled_arrays_are_rejected():
    strategy = _strategy(1, nodes=(5,))
    sent = _configure(strategy, np.zeros(6))
    msgs = sent.messages
    extra = {"weights": ArrayRecord({"x": Array(np.zeros(3, np.float32))})}
    new, out = _result(strategy.aggregate_train(sent, [raw_reply(
        msgs[0], np.ones(6), SPEC.hash, honest_metrics(), extra_arrays=extra)]))
    assert new is None and out.no_contribution
    assert "besides the delta" in out.rejected[0]["reason"]


def test_wrong_length_delta_is_rejected():
    strategy = _strategy(1, nodes=(5,))
    sent = _configure(strategy, np.zeros(6))
    msgs = sent.messages
    new, out = _result(strategy.aggregate_train(sent, [reply(msgs[0], np.ones(7), SPEC)]))
    assert new is None and "shape (7,)" in out.rejected[0]["reason"]


def test_cohorts_follow_partitions_not_random_node_ids():
    # Flower draws node ids at random per run; the same seed must pick the same partitions.
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        ids = rng.choice(10**9, size=8, replace=False).tolist()
        strategy = _strategy(3, ids, seed=5)
        runs.append([strategy.sample(r, FakeGrid(ids)) for r in (1, 2, 3)])
    assert runs[0] == runs[1]


def test_an_average_past_float32s_range_keeps_the_global_vector():
    strategy = _strategy(2)
    sent = _configure(strategy, np.full(6, 3e38))
    msgs = sent.messages
    top = np.float32(3.4e38)
    new, out = _result(strategy.aggregate_train(sent, [reply(msgs[0], np.full(6, top), SPEC),
                                                       reply(msgs[1], np.full(6, top), SPEC)]))
    assert new is None and out.no_contribution
    assert "overflows float32" in out.update_refused

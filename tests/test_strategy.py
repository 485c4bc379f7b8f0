"""DeltaFedAvg: weighted aggregation of deltas, rejection of bad replies, byte counting."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from fedtune.delta import DeltaSpec, decode, encode
from strategies import DeltaFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")


SPEC = DeltaSpec.from_state({"w": torch.zeros(4), "b": torch.zeros(2)}, "bb", {"m": 1})


def _reply(msg, delta, n, spec_hash=SPEC.hash, extra_arrays=None):
    arrays = {"delta": ArrayRecord({"vector": encode(np.asarray(delta, np.float32))})}
    arrays.update(extra_arrays or {})
    content = RecordDict({
        **arrays,
        "metrics": MetricRecord({"num-examples": n, "loss": 1.0, "flops": 10.0}),
        "info": ConfigRecord({"spec-hash": spec_hash}),
    })
    return Message(content=content, reply_to=msg)


def _configure(strategy, global_vec, nodes=(11, 12, 13, 14)):
    return list(strategy.configure_train(
        1, ArrayRecord({"vector": encode(np.asarray(global_vec, np.float32))}),
        ConfigRecord(), FakeGrid(nodes)))


def test_cohort_sampling_is_seeded_and_sized():
    s1, s2 = DeltaFedAvg(SPEC, 2, seed=3), DeltaFedAvg(SPEC, 2, seed=3)
    nodes = list(range(100, 120))
    a = [s1.sample(r, FakeGrid(nodes)) for r in range(1, 6)]
    b = [s2.sample(r, FakeGrid(nodes)) for r in range(1, 6)]
    assert a == b and all(len(set(c)) == 2 for c in a)
    assert len({tuple(c) for c in a}) > 1  # cohorts change between rounds


def test_weighted_mean_delta_is_added_to_global():
    strategy = DeltaFedAvg(SPEC, 2, seed=0)
    msgs = _configure(strategy, np.ones(6))
    assert len(msgs) == 2
    replies = [_reply(msgs[0], np.full(6, 1.0), 30), _reply(msgs[1], np.full(6, 4.0), 10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = decode(arrays["vector"], SPEC)
    assert np.allclose(new, 1.0 + (30 * 1.0 + 10 * 4.0) / 40)
    assert metrics["num-examples"] == 40
    assert sorted(a["num_examples"] for a in strategy.outcome.accepted) == [10, 30]


def test_bytes_are_counted_from_the_messages():
    strategy = DeltaFedAvg(SPEC, 3, seed=0)
    msgs = _configure(strategy, np.zeros(6))
    assert strategy.outcome.bytes_down == 3 * 6 * 4
    strategy.aggregate_train(1, [_reply(m, np.zeros(6), 5) for m in msgs])
    assert strategy.outcome.bytes_up == 3 * 6 * 4


def test_bad_replies_are_rejected_and_recorded_not_aggregated():
    strategy = DeltaFedAvg(SPEC, 4, seed=0)
    msgs = _configure(strategy, np.zeros(6))
    nan = np.zeros(6)
    nan[2] = np.nan
    replies = [
        _reply(msgs[0], np.full(6, 2.0), 10),                       # good
        _reply(msgs[1], nan, 10),                                    # non-finite
        _reply(msgs[2], np.zeros(6), 10, spec_hash="other"),         # wrong model
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[3]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(decode(arrays["vector"], SPEC), 2.0)
    out = strategy.outcome
    assert len(out.accepted) == 1 and len(out.rejected) == 2 and len(out.failed) == 1
    reasons = " ".join(r["reason"] for r in out.rejected)
    assert "non-finite" in reasons and "spec hash" in reasons
    assert out.failed[0]["reason"] == "client crashed"


def test_sampled_clients_that_never_reply_are_recorded_as_failed():
    strategy = DeltaFedAvg(SPEC, 3, seed=0)
    msgs = _configure(strategy, np.zeros(6), nodes=(11, 12, 13))
    arrays, _ = strategy.aggregate_train(1, [_reply(msgs[0], np.ones(6), 5)])
    assert np.allclose(decode(arrays["vector"], SPEC), 1.0)
    silent = {m.metadata.dst_node_id for m in msgs[1:]}
    assert {f["node"] for f in strategy.outcome.failed} == silent
    assert all("no reply within train.round_timeout_s" == f["reason"]
               for f in strategy.outcome.failed)


def test_smuggled_arrays_are_rejected():
    strategy = DeltaFedAvg(SPEC, 1, seed=0)
    msgs = _configure(strategy, np.zeros(6), nodes=(5,))
    extra = {"weights": ArrayRecord({"x": Array(np.zeros(3, np.float32))})}
    arrays, _ = strategy.aggregate_train(1, [_reply(msgs[0], np.ones(6), 3, extra_arrays=extra)])
    assert arrays is None
    assert "besides the delta" in strategy.outcome.rejected[0]["reason"]


def test_wrong_length_delta_is_rejected():
    strategy = DeltaFedAvg(SPEC, 1, seed=0)
    msgs = _configure(strategy, np.zeros(6), nodes=(5,))
    arrays, _ = strategy.aggregate_train(1, [_reply(msgs[0], np.ones(7), 3)])
    assert arrays is None and "shape (7,)" in strategy.outcome.rejected[0]["reason"]


def test_cohorts_follow_partitions_not_random_node_ids():
    # Flower draws node ids at random per run; the same seed must pick the same partitions.
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        ids = rng.choice(10**9, size=8, replace=False).tolist()
        strategy = DeltaFedAvg(SPEC, 3, seed=5)
        strategy.roster = {pid: node for pid, node in enumerate(ids)}
        inverse = {node: pid for pid, node in strategy.roster.items()}
        runs.append([[inverse[n] for n in strategy.sample(r, FakeGrid(ids))] for r in (1, 2, 3)])
    assert runs[0] == runs[1]

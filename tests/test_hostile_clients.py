"""Hostile clients, generated: whatever records and arrays a client replies with (wrong
types, NaN/inf, huge, negative, extra keys, spoofed ids, duplicates, replies nobody asked
for), the real strategy never raises, one client never moves the user-level release by more
than clip_norm / expected cohort, and every server-owned ledger field holds the server's
value. Messages are built in-process; no Ray.

Generated replies per run: at least 2 x 500 train replies (one to three per example, plus
strays) and 300 x 4..8 partition claims; at least 2,200 in all, about 4,000 on average.
"""

import json
import math

import numpy as np
import pytest
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import reply, spec_of, stray_message

from fedtune.config import UserDPConfig
from fedtune.wire.delta import array_bytes, encode
from fedtune.wire.protocol import DP_KEYS, EXTRA_GROUPS, EXTRAS, SERVER_OWNED, PartitionReply
from strategies import DeltaFedAvg
from strategies.discovery import discover
from strategies.pipeline import Round, RoundOutcome
from strategies.user_dp import UserLevelDP

pytestmark = pytest.mark.usefixtures("task_identity")

HOSTILE = settings(max_examples=500, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow,
                                          HealthCheck.function_scoped_fixture])
SPEC = spec_of(8)
POPULATION = 4
HOSTILE_PID = POPULATION - 1
CLIP = 1.0
HONEST = [np.random.default_rng(i).normal(size=SPEC.size) * s
          for i, s in enumerate((0.2, 3.0, 0.05))]

KNOWN = sorted({"num-examples", "loss", "steps", "examples-seen", "flops", *EXTRAS, *DP_KEYS})
SPOOFS = ["weight", "node", "partition-id", "partition_id", "delta-norm", "delta_norm",
          "bytes_up", "bytes-up", "reported_dp", "reason", "dp-steps-total"]
ints = st.integers(-3, 3) | st.integers(-2**70, 2**70) | st.just(10**400)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e308, -0.5])
values = (ints | floats | st.lists(st.integers(-2**64, 2**64), max_size=4)
          | st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))


def _honest_base(kind: str) -> dict:
    base = {"num-examples": 10, "loss": 0.5, "steps": 2, "examples-seen": 20, "flops": 1e6}
    if kind == "dp":
        base.update({"noise-multiplier": 1.1, "sample-rate": 0.2, "dp-steps": 2,
                     "epsilon": 0.8, "dp-history-sigma": [1.1], "dp-history-q": [0.2],
                     "dp-history-steps": [2]})
    elif kind in EXTRA_GROUPS:
        base.update({s.key: (1 if s.kind is int else 1.0) for s in EXTRA_GROUPS[kind]})
    return base


@st.composite
def metric_records(draw):
    metrics = _honest_base(draw(st.sampled_from(["plain", "dp", *EXTRA_GROUPS])))
    for key in draw(st.sets(st.sampled_from(sorted(metrics)), max_size=2)):
        del metrics[key]
    keys = st.sampled_from(KNOWN + SPOOFS) | st.text(max_size=8)
    metrics.update(draw(st.dictionaries(keys, values, max_size=4)))
    return metrics


@st.composite
def delta_arrays(draw):
    kind = draw(st.sampled_from(["ok", "ok", "huge", "nonfinite", "length", "raw"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "raw":
        return Array(dtype=draw(st.sampled_from(["float32", "float64", "int8", "", "bool"])),
                     shape=tuple(draw(st.lists(st.integers(0, 12), max_size=2))),
                     stype=draw(st.sampled_from(["fedtune.flat", "numpy.ndarray", "x"])),
                     data=draw(st.binary(max_size=64)))
    size = SPEC.size + (draw(st.sampled_from([-1, 1, -SPEC.size])) if kind == "length" else 0)
    scale = draw(st.sampled_from([1e-6, 0.3, 1.0, 7.0, 1e30, 1e38])) if kind != "ok" else 0.3
    vector = (rng.normal(size=size) * scale).astype(np.float32)
    if kind == "nonfinite" and size:
        vector[rng.integers(size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return encode(vector)


@st.composite
def replies_of(draw, msg: Message) -> list[Message]:
    """One to three replies from the hostile client's node, and maybe one from a node that
    was not asked."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 9)) == 0:
            out.append(Message(Error(code=1, reason=draw(st.text(max_size=20))), reply_to=msg))
            continue
        records = {"delta": ArrayRecord({"vector": draw(delta_arrays())}),
                   "metrics": MetricRecord(draw(metric_records()))}
        info = {"spec-hash": draw(st.sampled_from([SPEC.hash, SPEC.hash, "0" * 16, ""]))}
        shape = draw(st.sampled_from(["ok"] * 6 + ["info_extra", "info_int", "no_info",
                                                   "extra_arrays", "extra_metrics",
                                                   "no_delta"]))
        if shape == "info_extra":
            info["weight"] = "1000"
        if shape == "info_int":
            info["spec-hash"] = 7
        if shape != "no_info":
            records["info"] = ConfigRecord(info)
        if shape == "extra_arrays":
            records["delta"]["more"] = Array(np.zeros(2, np.float32))
        if shape == "extra_metrics":
            records["roster"] = MetricRecord({"partition-id": 0})
        if shape == "no_delta":
            del records["delta"]
        out.append(Message(content=RecordDict(records), reply_to=msg))
    if draw(st.booleans()):
        out.append(reply(stray_message(900 + draw(st.integers(0, 5))), np.ones(SPEC.size),
                         SPEC))
    return out


def _round(driver, hostile_replies) -> tuple[Round, list[Message]]:
    cohort = driver.sample(1, FakeGrid([]))
    sent = driver.configure_train(1, np.full(SPEC.size, 0.5, np.float32), 0.1, cohort)
    msgs = sent.messages
    honest = [reply(m, d, SPEC) for m, d in zip(msgs[:HOSTILE_PID], HONEST, strict=True)]
    extra = hostile_replies(msgs[HOSTILE_PID]) if hostile_replies else []
    return driver.aggregate_train(sent, honest + extra), msgs


def _check_ledger(strategy: DeltaFedAvg, out: RoundOutcome, msgs: list[Message],
                  sent: list[Message]) -> None:
    """Every server-owned field holds what the server computed, and the ledger is JSON."""
    asked = {s["node"]: s["partition_id"] for s in out.sampled}
    assert sorted(asked) == sorted(m.metadata.dst_node_id for m in msgs)
    first = {}
    for m in sent:
        first.setdefault(m.metadata.src_node_id, m)
    for entry in out.accepted + out.rejected + out.failed:
        assert asked[entry["node"]] == entry["partition_id"]
        assert strategy.roster[entry["partition_id"]] == entry["node"]
        if "bytes_up" in entry:
            assert entry["bytes_up"] == array_bytes(first[entry["node"]].content)
        reported = entry.get("reported_dp")
        assert reported is None or set(reported) == {"noise_multiplier", "sample_rate",
                                                     "steps", "epsilon", "history"}
    for entry in out.accepted:
        assert entry["weight"] == 1.0
        assert math.isfinite(entry["delta_norm"]) and entry["delta_norm"] >= 0
    for entry in out.unsolicited:
        assert set(entry) == {"node", "reason"}
    assert set(out.accepted[0]) & SERVER_OWNED <= {"node", "partition_id", "bytes_up",
                                                   "delta_norm", "weight", "reported_dp"}
    json.dumps([out.accepted, out.rejected, out.failed, out.unsolicited], allow_nan=False)


def _user_dp(clipping: str) -> UserLevelDP:
    strategy = DeltaFedAvg(SPEC, POPULATION, seed=0)
    strategy.roster = {pid: 100 + pid for pid in range(POPULATION)}
    # Poisson rate 1 (cohort == population) and no noise: the release is the bare sum.
    return UserLevelDP(strategy, UserDPConfig(enabled=True, clipping=clipping, clip_norm=CLIP),
                       0.0, POPULATION)


@HOSTILE
@given(st.data(), st.sampled_from(["server", "client"]))
def test_one_hostile_client_moves_the_user_level_release_by_at_most_its_bound(data, clipping):
    sent: list[Message] = []

    def hostile(msg):
        got = data.draw(replies_of(msg))
        sent.extend(got)
        return got

    with_it = _user_dp(clipping)
    result, msgs = _round(with_it, hostile)
    released, without = result.vector, _round(_user_dp(clipping), None)[0].vector
    moved = float(np.linalg.norm(released.astype(np.float64) - without.astype(np.float64)))
    # float32 rounding of a release near 0.5: a few ulps per coordinate.
    assert moved <= CLIP / POPULATION + 1e-6, moved
    assert max(result.outcome.aggregated_norms) <= CLIP * (1 + 1e-12)
    honest_sent = [reply(m, d, SPEC) for m, d in zip(msgs[:HOSTILE_PID], HONEST, strict=True)]
    _check_ledger(with_it.inner, result.outcome, msgs, honest_sent + sent)


@HOSTILE
@given(st.data())
def test_plain_fedavg_survives_any_reply_and_stays_finite(data):
    sent: list[Message] = []

    def hostile(msg):
        got = data.draw(replies_of(msg))
        sent.extend(got)
        return got

    strategy = DeltaFedAvg(SPEC, POPULATION, seed=0)
    strategy.roster = {pid: 100 + pid for pid in range(POPULATION)}
    result, msgs = _round(strategy, hostile)
    new = result.vector
    if new is None:  # only an update past float32's range is refused
        assert "overflows float32" in result.outcome.update_refused
    else:
        assert np.isfinite(new).all()
    honest_sent = [reply(m, d, SPEC) for m, d in zip(msgs[:HOSTILE_PID], HONEST, strict=True)]
    _check_ledger(strategy, result.outcome, msgs, honest_sent + sent)


class ClaimGrid(FakeGrid):
    def __init__(self, claims):
        super().__init__(sorted(claims))
        self.claims, self.sent = claims, []

    def push_messages(self, messages):
        self.sent = list(messages)
        return ["" for _ in self.sent]

    def pull_messages(self, ids):
        return [Message(content=RecordDict({"roster": MetricRecord(self.claims[
            m.metadata.dst_node_id])}), reply_to=m) for m in self.sent]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.integers(1, 50), st.dictionaries(
    st.sampled_from(["partition-id", "own-examples", "node", "x"]),
    values | st.integers(0, 5) | st.sampled_from([1, 10**7, 10**7 + 1]), max_size=3),
    min_size=4, max_size=8))
def test_discovery_binds_each_partition_to_one_node_whatever_nodes_claim(claims):
    strategy = DeltaFedAvg(SPEC, 2, seed=0)
    found = discover(ClaimGrid(claims), 4, timeout=1, wait_for_nodes_s=1)
    roster = strategy.adopt(found, sizes=[7, 8, 9, 10])
    assert set(roster) <= set(range(4)) and len(set(roster.values())) == len(roster)
    for pid, node in roster.items():
        claim = PartitionReply.from_record(RecordDict({"roster": MetricRecord(claims[node])}),
                                           4)
        assert claim.partition_id == pid
        # The server's count: the partition's size, or a node's own file's (bounded) count.
        assert strategy.examples[pid] == (7 + pid if claim.own_examples is None
                                          else claim.own_examples)
        assert 1 <= strategy.examples[pid] <= 10**7
    assert set(found.own_examples) <= set(roster)
    assert len(roster) + len(strategy.refused_claims) == len(claims)
    for refused in strategy.refused_claims:
        assert len(refused["reason"]) < 400

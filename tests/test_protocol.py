"""The wire protocol: round trips, and each finding of issue 17 item 1 reproduced against the
real strategy (a client's metrics overrode the server's own fields, or crashed the run)."""

import functools
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from wire import honest_metrics, raw_reply, reply, spec_of, stray_message

from fedtune.config import UserDPConfig, load_config
from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.plan import PrivacyPlan
from fedtune.run.checkpoint import ServerState
from fedtune.wire.protocol import (
    EXTRAS,
    SERVER_OWNED,
    WITHHOLDABLE,
    DomainSettings,
    PartitionQuery,
    PartitionReply,
    ProtocolError,
    PruneSettings,
    ReportedDP,
    TrainInstruction,
    TrainReply,
    TrainReport,
    bounded,
)
from strategies import DeltaFedAvg
from strategies.delta_fedavg import RoundHooks
from strategies.discovery import Roster, discover
from strategies.privacy_ledger import PrivacyLedger
from strategies.user_dp import UserLevelDP

pytestmark = pytest.mark.usefixtures("task_identity")
SPEC = spec_of(6)


def _fedavg(cohort=2, population=2, hooks=None):
    strategy = DeltaFedAvg(SPEC, cohort, seed=0, hooks=hooks)
    strategy.roster = {pid: 100 + pid for pid in range(population)}
    return strategy


def _user_dp(clipping="client", clip=1.0, cohort=2, population=2, **cfg):
    strategy = _fedavg(cohort, population)
    rounds = UserLevelDP(strategy, UserDPConfig(enabled=True, clipping=clipping,
                                                clip_norm=clip, **cfg), 0.0, population)
    return strategy, rounds


def _send(driver, rnd=1, vector=None):
    vector = np.zeros(SPEC.size, np.float32) if vector is None else vector
    return driver.configure_train(rnd, vector, 0.1, driver.sample(rnd, FakeGrid([])))


# -- round trips ---------------------------------------------------------------------------

def test_instruction_round_trips_every_field():
    history = DPHistory([(1.1, 0.25, 3), (0.9, 0.5, 2)])
    order = TrainInstruction(np.arange(6, dtype=np.float32), 4, 0.05, SPEC.hash, clip_norm=2.0,
                             dp_history=history, prune=PruneSettings(0.5, 2),
                             domain=DomainSettings(False, 3.0), withhold_metrics=True)
    back = TrainInstruction.from_record(order.to_record(), SPEC)
    np.testing.assert_array_equal(back.vector, order.vector)
    assert back.dp_history.entries == history.entries
    assert (back.server_round, back.lr, back.clip_norm, back.prune, back.domain,
            back.withhold_metrics) == (4, 0.05, 2.0, PruneSettings(0.5, 2),
                                       DomainSettings(False, 3.0), True)


def test_instruction_for_another_model_names_both_specs():
    order = TrainInstruction(np.zeros(6, np.float32), 1, 0.1, "f" * 16)
    with pytest.raises(ProtocolError, match=f"server spec f{{16}} != client spec {SPEC.hash}"):
        TrainInstruction.from_record(order.to_record(), SPEC)


def test_reply_round_trips_report_extras_and_reported_dp():
    extras = {"importance-weight": 1.5}
    dp = ReportedDP(1.2, 0.1, 4, 2.5, DPHistory([(1.2, 0.1, 8)]))
    sent = TrainReply.build(np.ones(6, np.float32), SPEC.hash,
                            TrainReport(4, 30, 0.7, 120, 1e9, extras), dp)
    got = TrainReply.from_record(sent.to_record())
    assert got.report == sent.report and got.dp == dp
    np.testing.assert_array_equal(got.decoded_delta(SPEC), np.ones(6, np.float32))
    assert got.report.ledger()["importance_weight"] == 1.5


def test_partition_reply_round_trips_and_is_checked():
    assert PartitionReply.from_record(PartitionReply(3).to_record(), 4) == PartitionReply(3)
    for bad in (4, -1):
        with pytest.raises(ProtocolError, match=r"partition-id must be in \[0, 3\]"):
            PartitionReply.from_record(PartitionReply(bad).to_record(), 4)
    with pytest.raises(ProtocolError, match="not the expected"):
        PartitionReply.from_record(PartitionQuery().to_record(), 4)


def test_no_reported_field_has_a_server_owned_name():
    names = {r.name for r in (*WITHHOLDABLE, *EXTRAS.values())} | {"steps"}
    assert not names & SERVER_OWNED


# -- issue 17, item 1: each finding, reproduced ----------------------------------------------

def test_weight_1000_cannot_break_the_user_level_bound():
    # main: the aggregate moved by 500 against a bound of clip / cohort = 0.5.
    strategy, rounds = _user_dp(clipping="client", clip=1.0)
    sent = _send(rounds)
    msgs = sent.messages
    honest = np.full(6, 1 / np.sqrt(6), np.float32) * 0.999
    hostile = raw_reply(msgs[1], honest, SPEC.hash, {**honest_metrics(), "weight": 1000.0})
    result = rounds.aggregate_train(sent, [reply(msgs[0], honest, SPEC), hostile])
    new = result.vector
    assert np.linalg.norm(new.astype(np.float64)) <= 1.0 / 2 + 1e-9
    (rejected,) = result.outcome.rejected
    assert "['weight']" in rejected["reason"] and rejected["partition_id"] == 1
    assert [c["weight"] for c in result.outcome.accepted] == [1.0]


def test_negative_weight_cannot_amplify_an_honest_delta():
    # main: weight -0.999 left a denominator of 0.01 and multiplied the honest delta by 1000.
    strategy = _fedavg()
    sent = _send(strategy)
    msgs = sent.messages
    hostile = raw_reply(msgs[1], np.zeros(6), SPEC.hash, {**honest_metrics(), "weight": -0.999})
    result = strategy.aggregate_train(sent, [reply(msgs[0], np.full(6, 0.1), SPEC), hostile])
    new = result.vector
    np.testing.assert_allclose(new, 0.1, rtol=1e-6)
    assert len(result.outcome.rejected) == 1


@pytest.mark.parametrize("metrics,reason", [
    ({k: v for k, v in honest_metrics().items() if k != "loss"}, "carry no 'loss'"),
    ({**honest_metrics(), "num-examples": [1, 2]}, "num-examples must be an int"),
    ({**honest_metrics(), "num-examples": float("inf")}, "num-examples must be an int"),
    ({**honest_metrics(), "loss": float("nan")}, "loss must be finite"),
    ({**honest_metrics(), "loss": -1.0}, r"loss must be in \[0"),
    ({**honest_metrics(), "num-examples": 0}, r"num-examples must be in \[1"),
    ({**honest_metrics(), "num-examples": 10**30}, r"num-examples must be in \[1"),
    ({**honest_metrics(), "steps": -3}, r"steps must be in \[0"),
    ({**honest_metrics(), "node": 5}, r"does not allow.*\['node'\]"),
    ({**honest_metrics(), "partition-id": 0}, r"does not allow.*\['partition-id'\]"),
    ({**honest_metrics(), "delta-norm": 0.0}, r"does not allow.*\['delta-norm'\]"),
    ({**honest_metrics(), "smashed-bytes-up": 3}, "part of the split figures"),
    ({**honest_metrics(), "dp-history-steps": [1] * 3}, "part of the DP spend"),
    ({**honest_metrics(), "noise-multiplier": 1.0, "sample-rate": 0.1, "dp-steps": 1,
      "dp-history-sigma": [1.0] * 65, "dp-history-q": [0.1] * 65,
      "dp-history-steps": [1] * 65}, "holds 65 items, at most 64"),
    ({**honest_metrics(), "noise-multiplier": 1.0, "sample-rate": 0.1, "dp-steps": 1,
      "dp-history-sigma": [1.0], "dp-history-q": [0.1, 0.2],
      "dp-history-steps": [1]}, "differ in length"),
    ({**honest_metrics(), "noise-multiplier": 1.0, "sample-rate": 1.5, "dp-steps": 1,
      "dp-history-sigma": [1.0], "dp-history-q": [0.1],
      "dp-history-steps": [1]}, r"sample-rate must be in \(0, 1\]"),
])
def test_a_malformed_report_is_rejected_with_its_reason_and_the_round_goes_on(metrics, reason):
    # main: KeyError / TypeError / OverflowError out of the strategy, ending the run.
    strategy = _fedavg()
    sent = _send(strategy)
    msgs = sent.messages
    result = strategy.aggregate_train(sent, [reply(msgs[0], np.full(6, 0.5), SPEC),
                                             raw_reply(msgs[1], np.ones(6), SPEC.hash, metrics)])
    new = result.vector
    np.testing.assert_allclose(new, 0.5, rtol=1e-6)
    (rejected,) = result.outcome.rejected
    assert rejected["partition_id"] == 1 and rejected["node"] == 101
    assert re.search(reason, rejected["reason"]), rejected["reason"]


def test_a_spoofed_node_or_partition_never_reaches_the_ledger():
    strategy = _fedavg(cohort=2, population=3)
    sent = _send(strategy)
    msgs = sent.messages
    asked = {m.metadata.dst_node_id for m in msgs}
    (outsider,) = {100, 101, 102} - asked
    spoof = {**honest_metrics(), "partition-id": 2, "node": outsider}
    replies = [raw_reply(msgs[0], np.ones(6), SPEC.hash, spoof),
               reply(msgs[1], np.ones(6), SPEC),
               reply(msgs[1], np.full(6, 9.0), SPEC),  # a second reply from one node
               reply(stray_message(outsider), np.full(6, 9.0), SPEC)]  # not asked
    result = strategy.aggregate_train(sent, replies)
    new = result.vector
    np.testing.assert_allclose(new, 1.0)
    out = result.outcome
    assert [c["node"] for c in out.accepted] == [msgs[1].metadata.dst_node_id]
    assert out.rejected[0]["node"] == msgs[0].metadata.dst_node_id
    pid_of = {node: pid for pid, node in strategy.roster.items()}
    assert out.rejected[0]["partition_id"] == pid_of[msgs[0].metadata.dst_node_id]
    assert len(out.unsolicited) == 2 and outsider in {u["node"] for u in out.unsolicited}


def test_forged_dp_history_stays_a_report_and_never_lowers_the_servers_charge():
    """A forged history (huge sigma: almost no spend) is kept as the client's report only.
    The server charged its own planned release when it sent the round; the forgery can
    neither replace that charge nor reach the client as the server's history."""
    cfg = load_config(None, ["data.num_clients=2", "train.clients_per_round=2",
                             "privacy.sample.accountant=rdp"])
    state = ServerState(round=0, vector=np.zeros(6), spec_hash=SPEC.hash, initial={})
    task = SimpleNamespace(partitions=[np.arange(64), np.arange(64)])
    privacy = PrivacyLedger(PrivacyPlan.of(cfg), [len(p) for p in task.partitions], state)
    strategy = _fedavg()
    sent = _send(strategy)
    msgs = sent.messages
    privacy.charge_sent(1, [0, 1])
    planned = epsilon_of(state.client_dp[0], 1e-5, "rdp")
    forged = ReportedDP(1e5, 1e-6, 1, 0.0, DPHistory([(1e5, 1e-6, 1)]))
    forged_reply = TrainReply.build(np.ones(6, np.float32), SPEC.hash,
                                    TrainReport(2, 10, 1.0, 20, 10.0), forged)
    result = strategy.aggregate_train(
        sent, [Message(content=forged_reply.to_record(), reply_to=msgs[0]),
               reply(msgs[1], np.ones(6), SPEC)])
    entry = result.outcome.accepted[0]
    assert entry["reported_dp"]["history"] == {"sigma": [1e5], "q": [1e-6], "steps": [1]}
    assert "noise_multiplier" not in entry and "epsilon" not in entry
    privacy.settle(1)
    held = state.client_dp[0]
    assert (1e5, 1e-6, 1) not in held.entries
    assert epsilon_of(held, 1e-5, "rdp") >= planned > 0
    strategy = _fedavg(hooks=RoundHooks(dp_history=lambda pid: state.client_dp.get(pid)))
    for msg in _send(strategy, rnd=2).messages:
        history = TrainInstruction.from_record(msg.content, SPEC).dp_history
        assert history is not None and 1e5 not in history.to_lists()["sigma"]


class DiscoveryGrid(FakeGrid):
    """Answers partition queries from a node -> claimed partition map."""

    def __init__(self, claims):
        super().__init__(list(claims))
        self.claims = claims
        self.sent = []

    def push_messages(self, messages):
        self.sent = list(messages)
        return ["" for _ in self.sent]  # unpushed messages carry an empty id

    def pull_messages(self, ids):
        out = []
        for msg in self.sent:
            claim = self.claims[msg.metadata.dst_node_id]
            content = (PartitionReply(claim).to_record() if isinstance(claim, int)
                       else RecordDict({"roster": MetricRecord(claim)}))
            out.append(Message(content=content, reply_to=msg))
        return out


def test_a_second_claim_on_a_partition_is_refused_for_that_node_only():
    # main: RuntimeError "partition 1 is claimed by nodes ..." ended the run.
    grid = DiscoveryGrid({7: 0, 8: 1, 9: 1, 10: {"partition-id": [2]}, 11: 2})
    strategy = DeltaFedAvg(SPEC, 2, seed=0)
    roster = strategy.adopt(discover(grid, 3, timeout=1, wait_for_nodes_s=1))
    assert roster == {0: 7, 1: 8, 2: 11}
    refused = {r["node"]: r["reason"] for r in strategy.refused_claims}
    assert set(refused) == {9, 10}
    assert "already held by node 8" in refused[9] and "partition-id must be an int" in refused[10]
    # The run goes on with the partitions that have a node.
    strategy.clients_per_round = 4
    assert sorted(strategy.sample(1, grid)) == [0, 1, 2]


def test_withheld_metrics_leave_the_client_and_are_refused_if_sent():
    strategy, rounds = _user_dp(clipping="server", withhold_metrics=True)
    sent = _send(rounds)
    msgs = sent.messages
    assert all(TrainInstruction.from_record(m.content, SPEC).withhold_metrics for m in msgs)
    lean = TrainReply.build(np.ones(6, np.float32), SPEC.hash, TrainReport(steps=3))
    result = rounds.aggregate_train(sent, [Message(content=lean.to_record(), reply_to=msgs[0]),
                                           reply(msgs[1], np.ones(6), SPEC)])
    (accepted,) = result.outcome.accepted
    assert accepted["steps"] == 3 and "num_examples" not in accepted and "loss" not in accepted
    assert "withheld" in result.outcome.rejected[0]["reason"]


def test_withholding_needs_user_level_dp():
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="withhold_metrics needs privacy.user.enabled"):
        load_config(None, ["privacy.user.withhold_metrics=true"])


def test_info_record_with_extra_keys_is_rejected():
    strategy = _fedavg()
    sent = _send(strategy)
    msgs = sent.messages
    bad = raw_reply(msgs[0], np.ones(6), SPEC.hash, honest_metrics())
    bad.content["info"] = ConfigRecord({"spec-hash": SPEC.hash, "weight": "1000"})
    result = strategy.aggregate_train(sent, [bad, reply(msgs[1], np.ones(6), SPEC)])
    assert "info holds keys" in result.outcome.rejected[0]["reason"]


# -- issue 27: the server owns counts, weights and its accounting ----------------------------

def _dp_reply(msg, dp, n=10):
    sent = TrainReply.build(np.ones(6, np.float32), SPEC.hash,
                            TrainReport(2, n, 1.0, 2 * n, 10.0), dp)
    return Message(content=sent.to_record(), reply_to=msg)


def _ledger_for(strategy, accountant="rdp"):
    cfg = load_config(None, ["data.num_clients=2", "train.clients_per_round=2",
                             f"privacy.sample.accountant={accountant}"])
    state = ServerState(round=0, vector=np.zeros(6), spec_hash=SPEC.hash, initial={})
    task = SimpleNamespace(partitions=[np.arange(64), np.arange(64)])
    return PrivacyLedger(PrivacyPlan.of(cfg), [len(p) for p in task.partitions], state), state


def test_a_forged_history_at_sigma_1e_200_neither_crashes_nor_changes_the_charge():
    # main: ZeroDivisionError in the accountant ended the run after round 1 (issue 27 #1).
    strategy = _fedavg()
    privacy, state = _ledger_for(strategy)
    sent = _send(strategy)
    msgs = sent.messages
    privacy.charge_sent(1, [0, 1])
    planned = {pid: list(h.entries) for pid, h in state.client_dp.items()}
    forged = ReportedDP(1e-200, 0.5, 1, 0.0, DPHistory([(1e-200, 0.5, 1)]))
    result = strategy.aggregate_train(sent, [_dp_reply(msgs[0], forged),
                                             _dp_reply(msgs[1], forged)])
    privacy.settle(1)
    assert {pid: h.entries for pid, h in state.client_dp.items()} == planned
    assert all(e["reported_dp"]["noise_multiplier"] == 1e-200
               for e in result.outcome.accepted)


def test_a_long_reported_history_costs_the_server_no_accountant_call(monkeypatch):
    # main: 64 distinct entries took 38.8 s (RDP) to 158 s (PRV) per epsilon, at least
    # twice per reply (issue 27 #2). Now settling runs no accountant at all.
    import strategies.release_plan as ledger_module  # the ledger accounts through it

    strategy = _fedavg()
    privacy, state = _ledger_for(strategy, "prv")
    sent = _send(strategy)
    msgs = sent.messages
    privacy.charge_sent(1, [0, 1])
    sigmas = [1.0 + 0.01 * i for i in range(64)]
    long = DPHistory([(s, 0.5, 1) for s in sigmas])
    reported = ReportedDP(1.0, 0.5, 64, 3.0, long)

    def no_accountant(*args, **kwargs):
        raise AssertionError("the server ran its accountant on a client's report")

    monkeypatch.setattr(ledger_module, "epsilon_of", no_accountant)
    started = time.perf_counter()
    result = strategy.aggregate_train(sent, [_dp_reply(msgs[0], reported),
                                             _dp_reply(msgs[1], reported)])
    privacy.settle(1)
    assert time.perf_counter() - started < 1.0
    assert len(result.outcome.accepted) == 2
    assert result.outcome.accepted[0]["reported_dp"]["history"]["sigma"] == sigmas


def test_the_planned_charge_is_one_accountant_call_per_history_and_round(monkeypatch):
    import fedtune.privacy.accounting as accounting

    calls: list[tuple] = []
    real = accounting._epsilon.__wrapped__

    def counted(entries, delta, accountant):
        calls.append(entries)
        return real(entries, delta, accountant)

    monkeypatch.setattr(accounting, "_epsilon", functools.lru_cache(maxsize=64)(counted))
    strategy = _fedavg()
    privacy, state = _ledger_for(strategy)
    for rnd in (1, 2):
        sent = _send(strategy, rnd=rnd)
        msgs = sent.messages
        assert privacy.stop_reason(rnd, [0, 1]) is None
        privacy.charge_sent(rnd, [0, 1])
        strategy.aggregate_train(sent, [reply(m, np.ones(6), SPEC) for m in msgs])
        privacy.settle(rnd)
        privacy.fields()
    # Both partitions have the same size, so the same history: one call per round, and one
    # for the budget under calibrated noise (the plan over its 8 rounds: FIX29M), once.
    assert len(calls) == len(set(calls)) == 3
    assert [sum(n for _, _, n in c) for c in calls] == [10, 80, 20]


def test_the_aggregation_weight_is_the_servers_count_never_the_replys():
    # main: the weight was the reply's num_examples (accepted up to 1e12): one client of
    # five took the model over (issue 27 #3).
    strategy = _fedavg()
    strategy.adopt(Roster(nodes=dict(strategy.roster)), sizes=[10, 10])
    sent = _send(strategy)
    msgs = sent.messages
    honest = reply(msgs[1], np.full(6, 2.0), SPEC, n=10)
    result = strategy.aggregate_train(sent, [reply(msgs[0], np.full(6, -1e3), SPEC, n=10**11),
                                             honest])
    new = result.vector
    np.testing.assert_array_equal(new, np.full(6, 2.0, np.float32))
    (rejected,) = result.outcome.rejected
    assert "reports 100000000000 examples; the server holds 10" in rejected["reason"]
    # An honest count is weighted by the server's figure, equal here: a plain mean.
    sent = _send(strategy)
    result = strategy.aggregate_train(sent, [reply(m, np.full(6, float(i)), SPEC, n=10)
                                             for i, m in enumerate(sent.messages)])
    new = result.vector
    np.testing.assert_allclose(new, np.full(6, 0.5))


def test_client_array_metadata_reaches_a_reason_bounded():
    # main: stype/dtype/shape were copied whole into the reason and the log (a 5 MB reason).
    strategy = _fedavg()
    sent = _send(strategy)
    msgs = sent.messages
    huge = "x" * 5_000_000
    bad = raw_reply(msgs[0], np.ones(6), SPEC.hash, honest_metrics())
    bad.content["delta"] = ArrayRecord({"vector": Array(dtype=huge, shape=(6,), stype=huge,
                                                        data=b"\0" * 24)})
    odd = raw_reply(msgs[1], np.ones(6), SPEC.hash, {**honest_metrics(), huge: 1})
    result = strategy.aggregate_train(sent, [bad, odd])
    reasons = [r["reason"] for r in result.outcome.rejected]
    assert len(reasons) == 2 and all(len(r) < 400 for r in reasons), [len(r) for r in reasons]
    assert "(5,000,0" in reasons[0] or "..." in reasons[0]


def test_bounded_cuts_text_and_says_how_long_it_was():
    assert bounded("short") == "short"
    cut = bounded("y" * 1000, 10)
    assert cut == "yyyyyyyyyy... (1,000 characters)"


def test_a_partition_reply_carries_an_own_data_count_within_bounds():
    assert PartitionReply.from_record(PartitionReply(1, 400).to_record(), 2) == \
        PartitionReply(1, 400)
    assert PartitionReply.from_record(PartitionReply(1).to_record(), 2).own_examples is None
    for bad in (0, 10**7 + 1, 2**70):
        with pytest.raises(ProtocolError, match="own-examples must be in"):
            PartitionReply.from_record(PartitionReply(1, bad).to_record(), 2)


def test_sampling_without_a_roster_is_an_error_not_an_invented_roster():
    # main: ensure_roster bound partitions to sorted node ids when discovery bound nobody.
    strategy = DeltaFedAvg(SPEC, 2, seed=0)
    with pytest.raises(RuntimeError, match="no partition has a node"):
        strategy.sample(1, FakeGrid([5, 6]))


def test_the_accountant_refuses_histories_outside_physical_ranges():
    from fedtune.privacy.accounting import check_history

    with pytest.raises(ValueError, match="outside \\[0.1, 1000\\] \\(prv"):
        epsilon_of(DPHistory([(0.05, 0.5, 1)]), 1e-5, "prv")  # PRV: inf or MemoryError
    for entries, what in [([(1e-200, 0.5, 1)], "noise multiplier"),
                          ([(1e6, 0.5, 1)], "noise multiplier"),
                          ([(1.0, 0.0, 1)], "sample rate"), ([(1.0, 1.5, 1)], "sample rate"),
                          ([(1.0, 0.5, 0)], "steps"), ([(1.0, 0.5, 10**9)], "steps"),
                          ([(1.0, 0.5, 1)] * 5000, "entries")]:
        with pytest.raises(ValueError, match=what):
            epsilon_of(DPHistory(entries), 1e-5, "rdp")
        with pytest.raises(ValueError):
            check_history(entries, "rdp")
    assert epsilon_of(DPHistory([(1.0, 0.5, 10)]), 1e-5, "rdp") > 0


def test_each_figure_group_has_its_type_with_the_ledger_names_in_order():
    """The typed groups (`fedtune.wire.figures`) and the wire's scalars stay one schema: a
    scalar added to a group without its field (or the reverse) fails here, not in a round."""
    from dataclasses import fields

    from fedtune.wire.figures import FIGURE_TYPES
    from fedtune.wire.protocol import EXTRA_GROUPS, TrainReport

    assert set(FIGURE_TYPES) == set(EXTRA_GROUPS)
    for name, group in EXTRA_GROUPS.items():
        assert [f.name for f in fields(FIGURE_TYPES[name])] == [s.name for s in group], name
        # A report carrying the group gives it typed, with each value under its name.
        values = {s.key: s.kind(i + 1) for i, s in enumerate(group)}
        report = TrainReport(steps=1, extras=values)
        typed = getattr(report, name)
        assert [getattr(typed, s.name) for s in group] == list(values.values())
        assert getattr(TrainReport(steps=1), name) is None

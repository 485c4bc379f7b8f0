"""User-level DP: clipping bound, noise scale, accountant agreement and the budget stop."""

import json
import numbers
from types import SimpleNamespace

import numpy as np
import pytest
from budget_cases import RELEASED_BOUND_STOP
from conftest import FakeGrid
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from inline_grid import TINY, inline_run
from wire import reply, spec_of

import strategies.server as server
from fedtune.config import UserDPConfig, load_config
from fedtune.privacy.plan import PrivacyPlan
from fedtune.privacy.user_level import UserLevelAccount, calibrate_user_noise
from fedtune.run.checkpoint import ServerState
from fedtune.run.curator_log import read_curator
from fedtune.wire.delta import clip_to_norm
from fedtune.wire.protocol import TrainInstruction
from strategies import DeltaFedAvg
from strategies.privacy_ledger import PrivacyLedger
from strategies.user_dp import UserLevelDP

pytestmark = pytest.mark.usefixtures("task_identity")


def _rounds(spec, clipping="server", sigma=0.0, clip=1.0, cohort=4, population=4, seed=0,
            reproducible=None):
    strategy = DeltaFedAvg(spec, cohort, seed=seed)
    strategy.roster = {pid: 100 + pid for pid in range(population)}
    cfg = UserDPConfig(enabled=True, clipping=clipping, clip_norm=clip)
    return strategy, UserLevelDP(strategy, cfg, sigma, population, reproducible)


def _round(rounds, spec, global_vec, deltas, rnd=1):
    # Population == cohort: Poisson rate 1, every client is sampled.
    cohort = rounds.sample(rnd, FakeGrid([]))
    sent = rounds.configure_train(rnd, global_vec, 0.1, cohort)
    msgs = sent.messages
    assert len(msgs) == len(deltas)
    replies = [reply(m, d, spec) for m, d in zip(msgs, deltas, strict=True)]
    result = rounds.aggregate_train(sent, replies)
    return msgs, result.vector, result.outcome


def test_server_side_clipping_bounds_every_delta_and_divides_by_the_cohort():
    spec = spec_of(6)
    strategy, rounds = _rounds(spec, clip=1.0)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=6) * s for s in (0.1, 3.0, 10.0, 0.5)]
    global_vec = np.full(6, 0.5, np.float32)
    _, new, outcome = _round(rounds, spec, global_vec, deltas)
    norms = outcome.aggregated_norms
    assert len(norms) == 4 and max(norms) <= 1.0 + 1e-12
    clipped = [d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas]
    np.testing.assert_allclose(new, global_vec + np.sum(clipped, 0) / 4, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-4, 0.0])
def test_noise_std_is_sigma_clip_over_cohort(scale):
    # scale 0: nobody moved; the round must still release noise, not the bare vector.
    spec = spec_of(40_000)
    strategy, rounds = _rounds(spec, sigma=1.3, clip=2.0, cohort=4, population=4)
    deltas = [np.random.default_rng(i).normal(size=spec.size) * scale for i in range(4)]
    _, new, outcome = _round(rounds, spec, np.zeros(spec.size, np.float32), deltas)
    noise = new - np.sum(deltas, 0) / 4
    expected = 1.3 * 2.0 / 4
    assert abs(float(np.std(noise)) / expected - 1) < 0.05
    assert abs(float(np.mean(noise))) < 5 * expected / np.sqrt(spec.size)
    assert outcome.no_contribution is (scale == 0.0)


def test_client_side_clipping_sends_the_norm_and_rejects_unclipped_deltas():
    spec = spec_of(6)
    strategy, rounds = _rounds(spec, clipping="client", clip=1.0, cohort=2, population=2)
    ok = clip_to_norm(np.full(6, 3.0, np.float32), 1.0)
    assert np.linalg.norm(ok.astype(np.float64)) <= 1.0
    msgs, new, outcome = _round(rounds, spec, np.zeros(6, np.float32), [ok, np.full(6, 3.0)])
    assert all(TrainInstruction.from_record(m.content, spec).clip_norm == 1.0 for m in msgs)
    assert [c["partition_id"] for c in outcome.accepted] == [0]
    assert "exceeds privacy.user.clip_norm=1.0" in outcome.rejected[0]["reason"]
    np.testing.assert_allclose(new, ok / 2, rtol=1e-6)


def test_poisson_cohorts_average_the_rate():
    strategy, rounds = _rounds(spec_of(2), cohort=5, population=20)
    sizes = [len(rounds.sample(r, FakeGrid([]))) for r in range(1, 401)]
    assert len(set(sizes)) > 3 and abs(np.mean(sizes) - 5) < 0.5


def test_cohorts_and_noise_are_secret_unless_reproducible():
    """Default: the same seed, round and inputs give other cohorts and other noise, and
    noise regenerated from the seed does not remove it. Reproducible mode: identical,
    including after a restart (a new wrapper: nothing carried between rounds)."""
    spec = spec_of(1000)
    deltas = [np.zeros(spec.size)] * 4

    def release(reproducible, rnd=3):
        strategy, rounds = _rounds(spec, sigma=1.0, clip=1.0, cohort=4, population=4,
                                   seed=7, reproducible=reproducible)
        return _round(rounds, spec, np.zeros(spec.size, np.float32), deltas, rnd=rnd)[1]

    a, b = release(None), release(None)
    assert not np.array_equal(a, b)
    for guess in (np.random.default_rng(7), np.random.RandomState(7)):
        regenerated = guess.normal(0.0, 0.25, spec.size)
        assert np.std(a - regenerated) > 0.3  # nothing removed: var 2 x 0.25^2
    assert np.array_equal(release(7), release(7))
    assert not np.array_equal(release(7, rnd=3), release(7, rnd=4))
    _, big = _rounds(spec_of(2), cohort=5, population=40, seed=7)
    _, big2 = _rounds(spec_of(2), cohort=5, population=40, seed=7)
    draws = [(big.sample(r, FakeGrid([])), big2.sample(r, FakeGrid([]))) for r in range(1, 9)]
    assert any(x != y for x, y in draws)


@pytest.mark.parametrize("sigma,cohort,population,rounds", [(0.87, 5, 20, 8), (2.0, 2, 4, 3)])
def test_epsilon_is_dp_accountings_own_value(sigma, cohort, population, rounds):
    ours = UserLevelAccount(sigma, cohort, population, 1e-5).epsilon(rounds)
    acc = RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(
        cohort / population, dp_event.GaussianDpEvent(sigma)), rounds)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_calibrated_noise_is_the_smallest_within_budget():
    sigma = calibrate_user_noise(3.0, 1e-5, 5, 20, 8, tolerance=1e-3)
    account = UserLevelAccount(sigma, 5, 20, 1e-5)
    assert account.epsilon(8) <= 3.0 < UserLevelAccount(sigma - 2e-3, 5, 20, 1e-5).epsilon(8)


def test_budget_stop_names_the_round_and_the_level():
    cfg = load_config(None, ["data.num_clients=4", "train.clients_per_round=2",
                             "privacy.sample.enabled=false", "privacy.user.enabled=true",
                             "privacy.user.noise_multiplier=1.0",
                             "privacy.user.target_epsilon=6.0"])
    state = ServerState(round=0, vector=np.zeros(1), spec_hash="x", initial={})
    ledger = PrivacyLedger(PrivacyPlan.of(cfg), [], state)
    for rnd in (1, 2):
        assert ledger.stop_reason(rnd, [0, 1]) is None
        ledger.settle(rnd)
    assert ledger.fields()["epsilon_user"] == pytest.approx(5.377, abs=1e-3)
    reason = ledger.stop_reason(3, [0, 1])
    assert "round 3 would raise the user-level epsilon to 6.48" in reason
    assert "privacy.user.target_epsilon=6.0" in reason


def test_noise_too_small_for_one_round_is_a_config_error():
    from fedtune.config import ConfigError
    from fedtune.sim.driver import check_user_budget

    cfg = load_config(None, ["privacy.user.enabled=true", "privacy.user.noise_multiplier=0.3",
                             "privacy.user.target_epsilon=1"])
    with pytest.raises(ConfigError, match=r"noise_multiplier=0.3 spends epsilon .* in the "
                                          r"first round alone"):
        check_user_budget(cfg)
    check_user_budget(load_config(None, ["privacy.user.enabled=true"]))  # calibrated: fine


# Moved here from tests/test_attackb_user_release.py (a review's reproducers, assertions kept):
# Attack (class 3, user-level DP): the release (rounds.jsonl, summary.json: "may be

pytestmark = pytest.mark.usefixtures("task_identity")

# q = 2/3: the cohort is a secret Poisson draw of the 3 partitions.
USER = ["privacy.sample.enabled=false", "privacy.user.enabled=true",
        "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50",
        "privacy.user.clipping=client", "train.clients_per_round=2"]
COHORT_DERIVED = ("clients", "sampled", "bytes_up", "client_flops", "train_loss")
SUMMARY_DERIVED = ("total_bytes_up", "total_client_flops")


def test_attackb_user_dp_release_has_no_cohort_figures(tmp_path, monkeypatch):
    """Under user-level DP no cohort size, cohort sum or unnoised cohort loss is released
    outside curator_log.jsonl."""
    # Three rounds: a single round's secret draw is empty with probability (1/3)^3 = 1/27,
    # and a run in which no round had a cohort ends in NoContributionError (flaky).
    cfg = load_config(None, [*TINY, *USER, "train.rounds=3"])
    out = tmp_path / "run"
    summary, _, _ = inline_run(cfg, out, monkeypatch)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    cohort = len(read_curator(out)[0]["per_client"])
    leaked = {k: rounds[0][k] for k in COHORT_DERIVED
              if isinstance(rounds[0].get(k), numbers.Number)
              and not isinstance(rounds[0].get(k), bool)}
    saved = json.loads((out / "summary.json").read_text())
    leaked |= {f"summary.{k}": saved[k] for k in SUMMARY_DERIVED
               if isinstance(saved.get(k), numbers.Number) and saved[k]}
    assert not leaked, (f"the release carries figures of the secret cohort (size {cohort} "
                        f"in the curator's log): {leaked}")


@pytest.mark.parametrize("empty", [True, False])
def test_a_user_level_release_does_not_say_whether_the_cohort_was_empty(tmp_path, empty):
    """`no_contribution` is true for an empty Poisson cohort, whose round is the short one:
    under user-level DP the release keeps both keys with null, and the curator's view (the
    server's "nobody contributed" check) still has the real flag."""
    from fedtune.config import load_config
    from fedtune.run.curator_log import append_curator, curator_view, split_record

    cfg = load_config(None, ["privacy.sample.enabled=false", "privacy.user.enabled=true"])
    # An empty cohort's round is also the short one (0.7 s against 4.2 s, a split run's).
    record = {"round": 1, "clients": 0 if empty else 2, "no_contribution": empty,
              "wall_s": 0.7 if empty else 4.2}
    public, curator = split_record(record, cfg)
    assert public["no_contribution"] is None and curator["no_contribution"] is empty
    assert public["wall_s"] is None and curator["wall_s"] == record["wall_s"]
    append_curator(tmp_path, curator)
    assert curator_view([public], tmp_path)[0]["no_contribution"] is empty


def test_a_budget_stop_with_both_levels_names_no_client_in_the_release(tmp_path, monkeypatch):
    """Under user-level DP the cohort is secret: the run stops when the released bound (a
    client sampled in every round) would pass the sample-level target, whoever was sampled,
    and summary.json's reason names no client (FIX29J)."""
    # q = 1 at user level (3 of 3): everyone trains in round 1. Sigma 2.5, 2 steps: client 1
    # (the smallest partition, q 1/57) is at epsilon 0.1384 after one round, 0.1418 after two.
    cfg = load_config(None, [*TINY, *RELEASED_BOUND_STOP])
    out = tmp_path / "run"
    inline_run(cfg, out, monkeypatch)
    stopped = json.loads((out / "summary.json").read_text())["stopped_early"]
    assert stopped["before_round"] == 2
    assert "client 1" not in stopped["reason"]
    # The bound is the smallest partition's (the worst plan), a figure of no cohort.
    # 0.14185...: shown rounded up, never below the accountant's figure.
    assert "bound (a client sampled in every round) to 0.1419" in stopped["reason"]
    assert "privacy.sample.target_epsilon=0.14" in stopped["reason"]
    # Nothing in it is the cohort's, so the curator's log gets no line of its own.
    assert [e for e in read_curator(out) if "stopped" in e] == []


def test_a_summary_with_both_levels_keeps_the_cohorts_parts_out_of_the_release(tmp_path,
                                                                                 monkeypatch):
    """summary.json's privacy sections (the ledger's at the end, FIX29M) are released as
    each round's are: under a secret cohort no per-client history or epsilon (their keys are
    partition ids of the sampled clients) and no cohort's delta norms, each key kept with
    the curator's pointer (the run-folder contract)."""
    from fedtune.run.curator_log import MOVED_NOTE

    cfg = load_config(None, [*TINY, "train.clients_per_round=2", "train.rounds=2",
                             "privacy.sample.accountant=rdp",
                             "privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
                             "privacy.user.target_epsilon=50", "privacy.user.clipping=client"])
    out = tmp_path / "run"
    inline_run(cfg, out, monkeypatch)
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for key in ("histories", "epsilon_by_client", "interrupted_rounds_charged"):
        assert summary["privacy_sample"][key] == rounds[-1]["privacy_sample"][key] == MOVED_NOTE
    assert summary["privacy_user"]["aggregated_delta_norms"] == MOVED_NOTE
    assert set(summary["privacy_user"]) == set(rounds[-1]["privacy_user"])


# ATTACK29C: the summary and the run's end say nothing of the secret cohorts.
SUMMARY_USER_DP = ["data.num_clients=8", "train.clients_per_round=2", "privacy.user.enabled=true",
           "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50"]


def _summary_wall(monkeypatch, elapsed_s: float) -> object:
    cfg = load_config(None, SUMMARY_USER_DP)
    kind = SimpleNamespace(summary_fields=lambda *a: {}, baseline=lambda *a: {})
    monkeypatch.setattr(server, "task_kind", lambda name: kind)
    monkeypatch.setattr(server, "validation_examples", lambda task, cfg: 0)
    monkeypatch.setattr(server, "pruning_record", lambda backbone, length: {})
    task = SimpleNamespace(spec=SimpleNamespace(size=4), backbone=SimpleNamespace(num_params=9))
    # One released round: every cohort figure null, as split_record leaves it.
    released = {"round": 1, "epsilon_sample": None, "epsilon_user": 0.5, "delta": 1e-5,
                "wall_s": None, "clients": None, "bytes_up": None, "bytes_down": None,
                "client_flops": None}
    state = ServerState(round=1, vector=np.zeros(3, np.float32), spec_hash="x", initial={},
                        elapsed_s=elapsed_s)
    return server._summary([released], state, task, cfg, {}).to_json()["wall_s"]


def test_a_user_level_summary_does_not_say_how_long_the_secret_cohorts_trained(monkeypatch):
    """Under user-level DP summary.json's wall_s is the same whoever was in the secret
    cohorts (the curator's, null in the release like each round's wall_s)."""
    empty = _summary_wall(monkeypatch, 0.7)   # the e2e split run's empty-cohort round
    three = _summary_wall(monkeypatch, 4.2)   # its 3-client round
    assert empty == three, f"summary wall_s {empty} vs {three} tells the cohorts apart"


def test_a_run_whose_secret_cohorts_were_all_empty_releases_as_any_other(tmp_path,
                                                                           monkeypatch):
    """Under user-level DP a run whose every secret Poisson draw was empty (probability
    (1-q)^(N x rounds), here 0.33^3 ~ 4%) writes summary.json and the final state like any
    other run: the release does not say no cohort held anyone."""
    cfg = load_config(None, [*TINY, "privacy.user.enabled=true",
                             "privacy.user.noise_multiplier=1.0",
                             "privacy.user.target_epsilon=50", "privacy.user.clipping=client"])
    monkeypatch.setattr(UserLevelDP, "sample", lambda self, rnd, grid: [])  # the secret draw
    out = tmp_path / "run"
    inline_run(cfg, out, monkeypatch)  # was: NoContributionError
    assert (out / "summary.json").exists()

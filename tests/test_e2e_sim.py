"""End to end: `fedtune run` through Flower's simulation engine (Ray), DP-SGD on, tiny
cohort. Checks the run-folder contract, that learning happened, that epsilon is the
accountant's and within budget, that only the trainable vector crossed the wire, and that
privacy spend survives kills, resumes and lost replies.

The shared run uses `privacy.reproducible_noise` (the tests that re-run or resume it compare
numbers bit for bit); the secret-noise resume test runs the default."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from clients.faults import draw_fault
from clients.handlers import client_seed
from fedtune.config import load_config
from fedtune.privacy import DPHistory, epsilon_of, planned_release
from fedtune.privacy.randomness import SECRET_NOISE_NOTE, SEEDED_NOISE_NOTE
from fedtune.run.checkpoint import load_pending
from fedtune.task.task import get_task

ROOT = Path(__file__).resolve().parents[1]
# As small as each assertion allows: every round costs client steps and a validation pass,
# every run an untrained and a final test pass, and many tests run this config. 2 steps of
# 32 per client and round still learn measurably in 3 rounds (test_learning_happened).
EVAL_EXAMPLES = 128
OVERRIDES = [
    "name=e2e", "data.num_clients=4", "train.clients_per_round=2", "train.rounds=3",
    "train.local_steps=2", "train.batch_size=32", "model.max_length=32",
    "tuning.prompt.length=4", f"train.eval_max_examples={EVAL_EXAMPLES}",
    "privacy.sample.target_epsilon=8",
]
REPRODUCIBLE = ["privacy.reproducible_noise=true"]
# One Ray actor instead of one per core: under the README's `-n 2` each xdist worker has one
# core (conftest.py), so a second actor only adds its start-up (torch, the client code, the
# model: about 11 CPU-seconds a run, measured); its clients take turns instead. The shared
# run keeps an actor per core (clients in parallel), as do the long tests that time rounds.
ONE_ACTOR = ["simulation.num_cpus=1"]
# The faulty run's round timeout: the round with the hanging client lasts exactly this long,
# and the other three clients of that round (actor start-up included: it is round 1) must
# reply within it. The same round without the hang (4 clients training, replies, validation
# pass and accounting) took 16.6 s on this 2-core machine at load average 4: a margin of
# 3.6x, 2.3x on a machine 1.6x slower (40 s left that one 1.5x). The old 45 s timed out a
# healthy client under heavier load with 4 steps a client.
FAULT_TIMEOUT_S = 60
ROUND_KEYS = {"round", "val_accuracy", "val_loss", "epsilon_sample", "epsilon_user", "delta",
              "clients", "bytes_up", "bytes_down", "client_flops", "wall_s"}
SUMMARY_KEYS = {"final_accuracy", "best_accuracy", "best_val_accuracy", "best_round",
                "final_val_accuracy", "validation_examples", "epsilon_sample", "epsilon_user",
                "delta", "rounds", "total_bytes_up", "total_bytes_down", "trainable_params",
                "backbone_params", "method", "wall_s"}


def _fedtune_run(config, out, overrides=()):
    args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def shared_quickstart(shared_run):
    """The shared run (conftest `shared_run`: once per test session, also read by
    tests/test_startup.py for its start-up lines)."""
    return shared_run(ROOT / "experiments/quickstart.toml", OVERRIDES + REPRODUCIBLE)


@pytest.fixture(scope="module")
def run_dir(shared_run):
    return shared_quickstart(shared_run).out


def _rounds(out):
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def _charged(cfg, rounds, interrupted=()):
    """Each client's DP history as an uninterrupted count gives it: its planned release
    for every round it was asked to train in (accepted, rejected or failed alike), and for
    every round charged after a kill."""
    sizes = {pid: len(part) for pid, part in enumerate(get_task(cfg).partitions)}
    expected: dict[int, DPHistory] = {}
    asked = [[c["partition_id"] for c in r["per_client"] + r["rejected"] + r["failed"]]
             for r in rounds] + [i["partition_ids"] for i in interrupted]
    for pids in asked:
        for pid in pids:
            expected.setdefault(pid, DPHistory()).add(*planned_release(cfg, sizes[pid]))
    return {str(pid): h.to_lists() for pid, h in sorted(expected.items())}


@pytest.mark.slow
def test_run_folder_contract(run_dir):
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert ROUND_KEYS <= set(r)
        assert r["clients"] == 2 and not r["rejected"] and not r["failed"]
    assert SUMMARY_KEYS <= set(summary)
    # Rounds are scored on the validation split; the test split only for the final model.
    assert all("accuracy" not in r and 0 <= r["val_accuracy"] <= 1 for r in rounds)
    best = max(rounds, key=lambda r: r["val_accuracy"])
    assert summary["best_accuracy"] == summary["best_val_accuracy"] == best["val_accuracy"]
    assert summary["best_round"] == best["round"]
    assert summary["final_val_accuracy"] == rounds[-1]["val_accuracy"]
    assert summary["validation_examples"] == min(EVAL_EXAMPLES, get_task(load_config(
        run_dir / "config.toml")).validation_rows.size)
    assert summary["epsilon_user"] is None and summary["method"] == "prompt"
    # Reproducible noise: every epsilon carries the marker.
    assert all(r["noise"] == SEEDED_NOISE_NOTE for r in rounds)
    assert summary["noise"] == SEEDED_NOISE_NOTE
    assert (run_dir / "final_state.safetensors").stat().st_size > 0
    resolved = tomllib.loads((run_dir / "config.toml").read_text())
    assert resolved["train"]["rounds"] == 3 and resolved["data"]["num_clients"] == 4


@pytest.mark.slow
def test_learning_happened(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.02, summary


@pytest.mark.slow
def test_only_the_trainable_vector_crosses_the_wire(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(run_dir / "config.toml")
    spec = get_task(cfg).spec
    vector_bytes = 4 * spec.size
    assert summary["trainable_params"] == spec.size
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        # Every array payload on every Message, both directions, summed per round.
        assert r["bytes_down"] == r["sampled"] * vector_bytes
        assert r["bytes_up"] == r["clients"] * vector_bytes
        assert all(c["bytes_up"] == vector_bytes for c in r["per_client"])


@pytest.mark.slow
def test_epsilon_is_the_accountants_and_within_budget(run_dir):
    cfg = load_config(run_dir / "config.toml")
    rounds = _rounds(run_dir)
    for r in rounds:
        p = r["privacy_sample"]
        # The server's own count, recomputed from the logged histories with the accountant.
        eps = {pid: epsilon_of(DPHistory.from_lists(h), r["delta"], p["accountant"])
               for pid, h in p["histories"].items()}
        assert eps == pytest.approx(p["epsilon_by_client"], rel=1e-3)
        assert r["epsilon_sample"] == pytest.approx(max(eps.values()), rel=1e-3)
        assert r["epsilon_sample"] <= cfg.privacy.sample.target_epsilon
        for c in r["per_client"]:
            # What a client reports is never more than the server charged it.
            reported = c["reported_dp"]
            hist = DPHistory.from_lists(reported["history"])
            assert epsilon_of(hist, r["delta"], p["accountant"]) == \
                pytest.approx(reported["epsilon"], rel=1e-3)
            assert reported["epsilon"] <= eps[str(c["partition_id"])] * (1 + 1e-9)
    assert rounds[-1]["privacy_sample"]["histories"] == _charged(cfg, rounds)
    # And with an independent accountant: Google's dp-accounting PLD (PRV's upper bound
    # measured +0.13 % above it at these parameters).
    assert rounds[-1]["privacy_sample"]["accountant"] == "prv"
    last = rounds[-1]
    pld = max(_pld_epsilon(h, last["delta"]) for h in last["privacy_sample"]["histories"].values())
    assert last["epsilon_sample"] == pytest.approx(pld, rel=0.01)


def _pld_epsilon(history, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in zip(history["sigma"], history["q"], history["steps"], strict=True):
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.slow
@pytest.mark.long
def test_crashes_hangs_and_corrupt_deltas_are_recorded_and_the_run_completes(tmp_path):
    # Seed 1729 draws, per round over the 4 clients: round 1 hang, nan, ok, crash; round 2
    # crash, length, ok, spec: every fault kind, a crash in each round, and the hang in
    # round 1, whose timeout the run waits out anyway (actor start-up happens in that round
    # too), so the hang costs no round of its own. The hanging client's reply comes 3 s
    # after the timeout, while the run goes on, and must not count in round 2.
    faults = ["seed=1729", "train.clients_per_round=4", "train.rounds=2",
              "train.local_steps=2", "faults.crash_p=0.3", "faults.garbage_p=0.3",
              "faults.hang_p=0.1", f"faults.hang_s={FAULT_TIMEOUT_S + 3}",
              f"train.round_timeout_s={FAULT_TIMEOUT_S}"]
    out = _fedtune_run(ROOT / "experiments/quickstart.toml", tmp_path / "faulty",
                       OVERRIDES + faults)
    cfg = load_config(out / "config.toml")
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    trainable = json.loads((out / "summary.json").read_text())["trainable_params"]
    kinds = {"nan": "non-finite", "length": "shape", "spec": "spec hash",
             "crash": "injected crash", "hang": "no reply within train.round_timeout_s"}
    for r in rounds:
        expected = {pid: draw_fault(cfg.faults, client_seed(cfg.seed, r["round"], pid))
                    for pid in range(4)}
        got = {c["partition_id"]: None for c in r["per_client"]}
        for c in r["rejected"] + r["failed"]:
            got[c["partition_id"]] = next(k for k, text in kinds.items() if text in c["reason"])
        assert got == expected, r
        assert r["clients"] + len(r["rejected"]) + len(r["failed"]) == r["sampled"] == 4
        assert r["bytes_up"] >= r["clients"] * 4 * trainable
    # Rejected clients' privacy spend is still on the ledger.
    spent = [x["reported_dp"]["epsilon"] for r in rounds for x in r["rejected"]
             if x.get("reported_dp")]
    assert spent and all(e <= rounds[-1]["epsilon_sample"] for e in spent)
    # So is the spend of clients that crashed or replied after train.round_timeout_s: the
    # server charged every client it asked, when it asked (the late reply of round 1
    # included: its planned steps are on the ledger).
    late = [c["partition_id"] for c in rounds[0]["failed"] if "round_timeout_s" in c["reason"]]
    assert late
    histories = rounds[-1]["privacy_sample"]["histories"]
    assert histories == _charged(cfg, rounds)
    assert all(sum(histories[str(pid)]["steps"]) >= cfg.train.local_steps for pid in late)


@pytest.mark.slow
def test_export_then_predict_reproduces_the_runs_test_accuracy(run_dir, tmp_path, cli):
    # `fedtune export` and `predict` in this process (the conftest `cli` fixture): a new
    # process would add seconds of imports to each and test nothing more.
    from fedtune.data import load_corpus

    export = tmp_path / "export"
    res = cli("export", str(run_dir), str(export))
    assert res.code == 0, res.output
    summary = json.loads((run_dir / "summary.json").read_text())
    n = summary["test_examples"]
    # The run's test rows: the corpus' test split less the copies of training rows.
    rows = get_task(load_config(run_dir / "config.toml")).test_rows[:n]
    test = load_corpus("spamassassin")["test"].select([int(i) for i in rows])
    texts = tmp_path / "test.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                             for t, y in zip(test["text"], test["label"], strict=True)))
    res = cli("predict", str(export), "--file", str(texts), "--out",
              str(tmp_path / "pred.jsonl"))
    assert res.code == 0, res.output
    correct = round(summary["final_accuracy"] * n)
    assert (f"accuracy {summary['final_accuracy']:.4f} on {n} labelled rows ({correct} right)"
            in res.stdout)
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    names = json.loads((export / "fedtune.json").read_text())["label_names"]
    hits = sum(names.index(p["label"]) == y for p, y in zip(preds, test["label"], strict=True))
    assert hits == correct


@pytest.fixture(scope="module")
def rerun_dir(run_dir, tmp_path_factory):
    """The shared run's resolved config re-run, killed (-9) after its first round and resumed:
    one run serves both the re-run and the resume checks (a Flower simulation each costs
    about a minute). Returns (folder, the round it was killed at)."""
    out = tmp_path_factory.mktemp("rerun") / "killed"
    killed_at = _kill_after_first_round(out, [], config=run_dir / "config.toml")
    _resume(out, killed_at)
    return out, killed_at


@pytest.mark.slow
@pytest.mark.long
def test_resolved_config_reruns_to_the_same_numbers(run_dir, rerun_dir):
    # Round 1 comes from the re-run itself, rounds 2-3 from its resume: both must replay the
    # shared run's numbers.
    again, killed_at = rerun_dir
    first = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (again / "rounds.jsonl").read_text().splitlines()]
    # Where the kill landed after the next round's charge (a fast server reaches it within
    # the poll's 0.2 s), that attempt is charged too: the later epsilons are the same or
    # larger, never smaller (test_kill_9_then_resume_... checks the charges themselves).
    interrupted = second[-1]["privacy_sample"]["interrupted_rounds_charged"]
    for a, b in zip(first, second, strict=True):
        assert (a["val_accuracy"], a["val_loss"]) == (b["val_accuracy"], b["val_loss"])
        if interrupted and a["round"] > killed_at:
            assert b["epsilon_sample"] >= a["epsilon_sample"]
        else:
            assert b["epsilon_sample"] == a["epsilon_sample"]
        assert [c["partition_id"] for c in a["per_client"]] == \
            [c["partition_id"] for c in b["per_client"]]


@pytest.mark.slow
@pytest.mark.long
def test_kill_9_then_resume_ends_with_the_uninterrupted_summary(run_dir, rerun_dir, cli):
    # Reproducible noise: the replayed round redraws the same noise, so the summary is the
    # uninterrupted run's, bit for bit, but for the charge of a round the kill cut short
    # (charged in every mode: a seeded replay may leave out a client it asked).
    out, killed_at = rerun_dir
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b.pop("resumed_at_rounds") == [killed_at] and a.pop("resumed_at_rounds") == []
    a.pop("wall_s"), b.pop("wall_s")
    last = _rounds(out)[-1]["privacy_sample"]
    interrupted = last["interrupted_rounds_charged"]
    _interrupted_as_charged(out, killed_at, interrupted)
    assert last["histories"] == _charged(load_config(out / "config.toml"), _rounds(out),
                                         interrupted)
    eps_a, eps_b = a.pop("epsilon_sample"), b.pop("epsilon_sample")
    if interrupted:
        assert eps_b >= eps_a
    else:
        assert eps_b == pytest.approx(eps_a, rel=1e-9)
    assert a.keys() == b.keys()
    # The charges of the kill's attempt (checked above) are all that may differ.
    charges = {"histories", "epsilon_by_client", "interrupted_rounds_charged"}
    for key, value in a.items():
        if key == "privacy_sample" and interrupted:
            assert b[key]["histories"] == last["histories"]
            assert {k: v for k, v in b[key].items() if k not in charges} == \
                {k: v for k, v in value.items() if k not in charges}
        elif isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert b[key] == value, key
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]  # none repeated, none lost

    again = cli("run", "--resume", str(out))
    assert again.code == 2 and "already finished" in " ".join(again.stdout.split())


# Run folder -> whether the kill landed after the next round's charge (`privacy_pending`).
CHARGED_AT_KILL: dict[Path, bool] = {}


def _kill_after_first_round(out, overrides, config=ROOT / "experiments/quickstart.toml"):
    args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "rounds.jsonl").exists() or not (out / "rounds.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "no round finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and every actor, mid round 2
    proc.wait()
    assert not (out / "summary.json").exists()
    killed_at = len((out / "rounds.jsonl").read_text().splitlines())
    assert killed_at < 3
    # Whether round killed_at + 1 was charged before the kill (its charges on disk): then
    # the resume must charge that attempt (`_interrupted_as_charged`), else none.
    pending = load_pending(out)
    CHARGED_AT_KILL[out] = pending is not None and pending["round"] == killed_at + 1
    return killed_at


def _interrupted_as_charged(out, killed_at, interrupted) -> None:
    """The resumed run charged the killed attempt exactly when it was charged before the
    kill: a charge lost with the kill (or one invented) fails here."""
    want = [killed_at + 1] if CHARGED_AT_KILL[out] else []
    assert [i["round"] for i in interrupted] == want, (interrupted, want)


def _resume(out, killed_at, sets=()):
    args = [sys.executable, "-m", "fedtune.cli", "run", "--resume", str(out)]
    for item in sets:
        args += ["--set", item]
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming after round {killed_at} of 3" in resumed.stdout
    return resumed


@pytest.mark.slow
@pytest.mark.long
def test_secret_noise_resume_continues_the_ledger_with_no_spend_lost_or_double_counted(
        run_dir, tmp_path, cli):
    out = tmp_path / "secret"
    killed_at = _kill_after_first_round(out, OVERRIDES)
    # A resume with other privacy parameters is refused, naming them, before any actor.
    config = (out / "config.toml").read_text()
    (out / "config.toml").write_text(config.replace("\nrounds = 3\n", "\nrounds = 5\n", 1))
    edited = cli("run", "--resume", str(out))
    said = " ".join(edited.output.split())  # rich wraps long lines
    assert edited.code != 0 and "changed: train.rounds (3 -> 5)" in said
    (out / "config.toml").write_text(config)
    _resume(out, killed_at)
    cfg = load_config(out / "config.toml")
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    last = rounds[-1]
    interrupted = last["privacy_sample"]["interrupted_rounds_charged"]
    # Round 2's instructions may have gone out before the kill: then its clients may have
    # uploaded updates with noise the replay does not redraw, and they are charged twice.
    _interrupted_as_charged(out, killed_at, interrupted)
    assert last["privacy_sample"]["histories"] == _charged(cfg, rounds, interrupted)
    assert all(r["noise"] == SECRET_NOISE_NOTE for r in rounds)
    # Secret noise: the same config and seed did not redraw the reproducible run's noise.
    assert rounds[0]["val_loss"] != _rounds(run_dir)[0]["val_loss"]


@pytest.fixture(scope="module")
def user_dp_run(tmp_path_factory):
    """One run for user-level DP and population expansion, both DP levels on: 8 clients
    (4 from the target domain), 4 a round, importance weighting; user-level sigma 1 with a
    budget of 6. q = 4/8: user-level epsilon 3.89, 5.38, 6.48 after rounds 1..3, so the
    budget stops the run before round 3. Seeded noise: a secret Poisson cohort at q = 1/2
    holds only target or only source partitions over both rounds with chance 1/128, and the
    tests read both kinds (a CI run drew partitions 5, 6 and 7 alone); seed 0 draws
    {0, 2, 3, 5, 6, 7} and {0, 1, 2, 7}, which the tests check against the seeded source."""
    sets = OVERRIDES + [
        "data.num_clients=8", "train.clients_per_round=4", "train.rounds=3",
        "data.partition=iid", "data.domain_by=collection",
        "data.target_domain=set2", "data.target_clients=4", "tuning.domain_head=true",
        "privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
        "privacy.user.target_epsilon=6.0", "privacy.user.clip_norm=0.5",
        # The tests read per-client figures: sent, and logged in rounds.jsonl.
        "privacy.disclose_counts=true", "privacy.user.log_cohorts=true",
        'plugins=[{name = "population_expansion", weighting = "importance", lam = 0.5}]',
        *REPRODUCIBLE, *ONE_ACTOR]
    return _fedtune_run(ROOT / "experiments/quickstart.toml",
                        tmp_path_factory.mktemp("user") / "user", sets)


def _seeded_cohort(partitions: int, rate: float, server_round: int, seed: int = 0) -> list[int]:
    """The user-level Poisson cohort that `privacy.reproducible_noise` draws for a round."""
    from fedtune.privacy.randomness import dp_source
    from strategies.user_dp import COHORT_STREAM

    joins = dp_source(f"{COHORT_STREAM}/round-{server_round}", seed).bernoulli(partitions, rate)
    return [pid for pid, joined in enumerate(joins) if joined]


@pytest.mark.slow
def test_user_level_dp_clips_accounts_and_stops_at_the_budget(user_dp_run):
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    out = user_dp_run
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert summary["stopped_early"]["before_round"] == 3
    assert "user-level epsilon to 6.48" in summary["stopped_early"]["reason"]
    for r in rounds:
        p = r["privacy_user"]
        # Clipped to clip_norm before weighting (weights <= 1).
        assert all(n <= 0.5 * (1 + 1e-9) for n in p["aggregated_delta_norms"])
        acc = RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(
            p["sample_rate"], dp_event.GaussianDpEvent(p["noise_multiplier"])), p["rounds"])
        assert r["epsilon_user"] == pytest.approx(acc.get_epsilon(p["delta"]), rel=0.01)
        assert r["epsilon_user"] <= 6.0
        # Both seeded cohorts are non-empty, so some client was charged in each round.
        assert r["privacy_sample"]["histories"] and r["epsilon_sample"] <= 8.0
    assert summary["epsilon_user"] == rounds[-1]["epsilon_user"]


@pytest.mark.slow
def test_el2n_pruning_halves_the_examples_and_composes_with_user_level_dp(tmp_path):
    # 40 clients of 105 examples (iid): one epoch over the kept half is 2 steps of 32, after
    # each client scored all of its examples (a forward pass each). Small: scoring and
    # training are most of this run's work. Large enough: an unpruned epoch (105 examples
    # a client) would still break the bound on examples_trained (52.5 + 32 a client). Seeded
    # noise: a secret Poisson cohort at q = 4/40 is empty with chance 1.5 % a round, and the
    # test reads round 1's clients; seed 0 draws 5 and 4 partitions.
    sets = OVERRIDES + [
        "data.num_clients=40", "data.partition=iid", "train.clients_per_round=4",
        "train.rounds=2",
        "privacy.sample.enabled=false", "privacy.user.enabled=true", "train.local_epochs=1",
        "privacy.user.log_cohorts=true",  # the test reads the per-client figures
        'plugins=[{name = "el2n_pruning", keep = 0.5, every = 2}]', *REPRODUCIBLE, *ONE_ACTOR]
    out = _fedtune_run(ROOT / "experiments/quickstart.toml", tmp_path / "pruned", sets)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [sorted(c["partition_id"] for c in r["per_client"]) for r in rounds] == [
        _seeded_cohort(40, 0.1, r["round"]) for r in rounds]
    for r in rounds:
        p = r["pruning"]
        for c in r["per_client"]:
            assert c["examples_kept"] == -(-c["examples_available"] // 2)  # ceil(n / 2)
        assert p["examples_kept"] == sum(c["examples_kept"] for c in r["per_client"])
        assert p["examples_trained"] <= p["examples_available"] / 2 + 32 * len(r["per_client"])
        assert r["epsilon_user"] is not None and r["epsilon_sample"] is None
    assert rounds[0]["pruning"]["clients_rescored"] == rounds[0]["clients"]


@pytest.mark.slow
def test_population_expansion_with_importance_weighting_composes_with_both_dp_levels(
        user_dp_run):
    out = user_dp_run
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_domain"] == "collection=set2"
    assert (summary["target_clients"], summary["source_clients"]) == (4, 4)
    assert summary["epsilon_user"] is not None and summary["epsilon_sample"] is not None
    # q = cohort / whole expanded population
    assert rounds[0]["privacy_user"]["sample_rate"] == pytest.approx(4 / 8)
    assert [sorted(c["partition_id"] for c in r["per_client"]) for r in rounds] == [
        _seeded_cohort(8, 0.5, r["round"]) for r in rounds]
    clients = [c for r in rounds for c in r["per_client"]]
    assert {c["partition_id"] < 4 for c in clients} == {True, False}
    for c in clients:
        source = c["partition_id"] >= 4
        assert c["weight"] == (0.5 if source else 1.0)
        assert c["importance_weight"] > 0 and (source or c["importance_weight"] == 1.0)
    assert all(r["expansion"]["weighting"] == "importance" for r in rounds)

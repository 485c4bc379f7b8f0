"""Checkpoint and ledger repair: what `fedtune run --resume` relies on after a kill, and the
privacy parameters a resume must not change."""

import json
import random
import re

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.privacy import DPHistory
from fedtune.run.checkpoint import (
    PENDING_FILE,
    CheckpointError,
    ServerState,
    load_checkpoint,
    load_pending,
    privacy_fingerprint,
    save_checkpoint,
    save_pending,
)
from fedtune.run.ledger import Ledger, LedgerError


def _state(rnd=2):
    return ServerState(round=rnd, vector=np.arange(5, dtype=np.float32), spec_hash="abc",
                       initial={"accuracy": 0.5, "loss": 0.7}, client_eps={3: 1.5},
                       client_dp={3: DPHistory([(1.1, 0.1, 20)])},
                       record={"round": rnd, "accuracy": 0.9}, elapsed_s=12.5,
                       interrupted=[{"round": 1, "partition_ids": [3]}],
                       examples={3: 40, 7: 1200})


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
    assert state.examples == {3: 40, 7: 1200}  # the counts fixed at discovery (FIX29L)
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
    # Round 1's checkpoint with no ledger line yet: its record is appended.
    (tmp_path / "rounds.jsonl").unlink()
    Ledger(tmp_path).restore(1, {"round": 1})
    assert Ledger(tmp_path).rounds() == [{"round": 1}]


# -- the privacy fingerprint is the table of what the mechanisms read -------------------------

def test_resume_refuses_a_changed_local_loss_fraction(tmp_path):
    # It decides how many of a round's steps are split steps: the smashed-data noise is
    # calibrated over them, so the past releases were accounted under the old fraction.
    sets = ["split.enabled=true", "split.smashed_dp.enabled=true", "train.local_steps=10"]
    state = _state()
    state.privacy = privacy_fingerprint(load_config(None, sets))
    save_checkpoint(tmp_path, state)
    edited = load_config(None, [*sets, "split.local_loss_fraction=0.5"])
    with pytest.raises(CheckpointError, match=r"split.local_loss_fraction \(0.0 -> 0.5\)"):
        load_checkpoint(tmp_path, "abc", privacy_fingerprint(edited))


class Tracing:
    """A config that records the dotted key of every value read through it."""

    def __init__(self, obj, seen, path=""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_seen", seen)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name):
        import dataclasses

        value = getattr(self._obj, name)
        path = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return Tracing(value, self._seen, path)
        self._seen.add(path)
        return value

    def __setattr__(self, name, value):
        raise AssertionError(f"a mechanism wrote the config ({name})")


def _covered(key, table):
    return any(key == p or key.startswith(p + ".") for keys in table.values() for p in keys)


def _trace_dp_sgd(cfg):
    from fedtune.privacy.plan import local_steps, planned_release

    for n in (40, 100):
        planned_release(cfg, n), local_steps(cfg, n)


def _trace_smashed_dp(cfg):
    from fedtune.split.plan import smashed_plan, smashed_privacy_events

    for n in (40, 100):
        smashed_plan(cfg, n), smashed_privacy_events(cfg, n)


def _trace_server_ledger(cfg):
    """The server's ledger over a round (charges, budget stop, settle, fields), the pruning
    plugin's example counts and the user-level wrapper, on partitions of 3 sizes."""
    from types import SimpleNamespace

    from fedtune.privacy.plan import PrivacyPlan
    from fedtune.run.checkpoint import ServerState
    from strategies import privacy_ledger
    from strategies.plugins import build_plugins
    from strategies.user_dp import UserLevelDP

    task = SimpleNamespace(partitions=[np.arange(n) for n in (40, 100, 100)])
    state = ServerState(round=0, vector=np.zeros(1, np.float32), spec_hash="x", initial={})
    ledger = privacy_ledger.PrivacyLedger(PrivacyPlan.of(cfg),
                                          [len(p) for p in task.partitions], state)
    ledger.releases.size_hooks += [p.trained_sizes for p in build_plugins(cfg)]
    if cfg.split.enabled:
        from fedtune.split.plan import smashed_privacy_events

        ledger.releases.plan_hooks.append(lambda rnd, pid, n: smashed_privacy_events(cfg, n))
    ledger.stop_reason(1, [0, 1, 2])
    ledger.charge_sent(1, [0, 1, 2])
    ledger.settle(1)
    ledger.fields()
    if ledger.user is not None:
        UserLevelDP(SimpleNamespace(clients_per_round=cfg.train.clients_per_round),
                    cfg.privacy.user, ledger.user.noise_multiplier, cfg.data.num_clients)


# Every mechanism of the table, traced: a mechanism added to the table needs its tracer.
TRACERS = {"dp_sgd": _trace_dp_sgd, "smashed_dp": _trace_smashed_dp,
           "user_level": _trace_server_ledger, "plugins": _trace_server_ledger,
           "partitions": None}  # the partitioner's inputs: the whole data section and seed
TRACED_CONFIGS = [
    [],
    ["privacy.sample.noise_multiplier=1.1", "train.local_epochs=1"],
    ["split.enabled=true", "split.smashed_dp.enabled=true", "split.local_loss_fraction=0.5",
     "split.cut_layer=0"],
    ["privacy.user.enabled=true", "privacy.user.clipping=client", "privacy.sample.enabled=false"],
    ["privacy.reproducible_noise=true", "privacy.user.enabled=true",
     "privacy.user.noise_multiplier=1.0"],
    ['plugins=[{name="el2n_pruning", keep=0.5, allow_with_sample_dp=true}]',
     "privacy.sample.accountant=rdp"],
]


@pytest.mark.parametrize("sets", TRACED_CONFIGS, ids=lambda s: ",".join(s) or "default")
def test_no_mechanism_reads_a_config_value_outside_the_privacy_table(sets, monkeypatch):
    from fedtune.run.checkpoint import PRIVACY_PARAMETERS

    assert set(TRACERS) == set(PRIVACY_PARAMETERS)
    seen: set[str] = set()
    cfg = Tracing(load_config(None, ["data.num_clients=4", "train.clients_per_round=2",
                                     "train.rounds=3", "privacy.sample.accountant=rdp",
                                     *sets]), seen)
    for tracer in {t for t in TRACERS.values() if t is not None}:
        tracer(cfg)
    # What every run's plan reads, and what each setting adds.
    assert {"privacy.sample.enabled", "privacy.user.enabled", "train.batch_size",
            "privacy.sample.delta", "privacy.reproducible_noise"} <= seen, sorted(seen)
    if "split.enabled=true" in sets:
        assert {"split.local_loss_fraction", "split.smashed_dp.target_epsilon"} <= seen
    if any(s.startswith("privacy.user.enabled=true") for s in sets):
        assert {"privacy.user.clip_norm", "data.num_clients"} <= seen
    outside = sorted(k for k in seen if not _covered(k, PRIVACY_PARAMETERS))
    assert not outside, f"mechanisms read config values outside PRIVACY_PARAMETERS: {outside}"


def test_a_read_outside_the_table_is_caught():
    from fedtune.run.checkpoint import PRIVACY_PARAMETERS

    seen: set[str] = set()
    cfg = Tracing(load_config(None, []), seen)
    _ = cfg.train.lr, cfg.split.smashed_dp.target_epsilon
    assert sorted(k for k in seen if not _covered(k, PRIVACY_PARAMETERS)) == ["train.lr"]


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, {"name": "other"}]
    raise AssertionError(f"no perturbation for {value!r}")


def _set_key(cfg, key, value):
    *parents, leaf = key.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def test_perturbing_any_mechanism_parameter_changes_the_fingerprint_and_is_refused(tmp_path):
    import copy

    base = load_config(None, TRACED_CONFIGS[2] + ["privacy.user.enabled=true"])
    saved = privacy_fingerprint(base)
    state = _state()
    state.privacy = saved
    save_checkpoint(tmp_path, state)
    assert {"split.local_loss_fraction", "split.enabled", "privacy.sample.delta",
            "split.smashed_dp.activation_clip_norm", "privacy.user.clip_norm", "seed",
            "train.batch_size", "plugins", "data.alpha"} <= set(saved)
    for key in saved:
        cfg = copy.deepcopy(base)
        _set_key(cfg, key, _perturbed(_get(cfg, key)))
        assert privacy_fingerprint(cfg) != saved, key
        with pytest.raises(CheckpointError, match=f"changed: {re.escape(key)} "):
            load_checkpoint(tmp_path, "abc", privacy_fingerprint(cfg))


def _get(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_pending_charges_and_checkpoint_are_fsynced_before_they_replace_the_old(
        tmp_path, monkeypatch):
    """A charge is durable before its instruction leaves: the data is fsynced before the
    rename, and the folder after it (a power cut keeps the old file or the new one)."""
    import os

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_pending(tmp_path, {"round": 1, "attempts": [{"0": [[1.0, 0.5, 2]]}]})
    save_checkpoint(tmp_path, _state(0))
    assert calls == [("fsync", "file"), ("replace", PENDING_FILE), ("fsync", "dir"),
                     ("fsync", "file"), ("replace", "checkpoint.safetensors"),
                     ("fsync", "dir")]

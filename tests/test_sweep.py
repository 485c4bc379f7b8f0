"""Sweep files: parsed, every variant validated before anything runs."""

from pathlib import Path

import pytest

from fedtune.config import ConfigError, load_config
from fedtune.study.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_dp_levels_sweep_loads_all_variants():
    sweep = load_sweep(ROOT / "experiments/dp_levels.toml")
    assert sweep.base == ROOT / "experiments/quickstart.toml"
    names = [v.name for v in sweep.variants]
    assert names == ["no-dp", "sample-eps1", "sample-eps3", "sample-eps8",
                     "user-eps1", "user-eps3", "user-eps8"]


def test_headline_sweep_is_four_methods_five_budgets_three_seeds():
    sweep = load_sweep(ROOT / "experiments/privacy_utility.toml")
    assert len(sweep.variants) == 4 * 5 * 3
    overrides = {frozenset(v.overrides) for v in sweep.variants}
    assert len(overrides) == 60
    assert sum("privacy.sample.enabled=false" in v.overrides for v in sweep.variants) == 12
    assert sum("split.enabled=true" in v.overrides for v in sweep.variants) == 15
    # The shared `set` comes first, so a run's own settings override it.
    assert all(v.overrides[0] == "model.max_length=32" for v in sweep.variants)


def test_a_runs_own_set_overrides_the_shared_set(tmp_path):
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(
        'name = "s"\nbase = "q.toml"\nset = ["train.rounds=3", "seed=4"]\n'
        '[[run]]\nname = "a"\nset = ["train.rounds=2"]\n')
    (variant,) = load_sweep(tmp_path / "s.toml").variants
    cfg = load_config(tmp_path / "q.toml", list(variant.overrides))
    assert (cfg.train.rounds, cfg.seed) == (2, 4)


@pytest.mark.parametrize("body,message", [
    ('name = "s"\nbase = "q.toml"', "needs at least one [[run]]"),
    ('name = "s"\nbase = "q.toml"\ncolour = 1\n[[run]]\nname = "a"', "unknown keys ['colour']"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "a"\n[[run]]\nname = "a"', "names repeat"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "a"\nset = [1]', "`set` list of key=value"),
    ('name = "s"\nbase = "q.toml"\nset = "x=1"\n[[run]]\nname = "a"', "top-level `set`"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "bad"\nset = ["train.rounds=0"]',
     "run 'bad': train.rounds must be > 0"),
])
def test_bad_sweeps_are_refused_before_any_run(tmp_path, body, message):
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(body + "\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(tmp_path / "s.toml")


def test_grid_expands_every_combination_in_order(tmp_path):
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(
        'name = "s"\nbase = "q.toml"\n[[run]]\nname = "dp"\n'
        'grid = {"privacy.sample.target_epsilon" = [1, 2.5], "tuning.method" = '
        '["prompt", "lora"]}\n[[run]]\nname = "off"\nset = ["privacy.sample.enabled=false"]\n')
    sweep = load_sweep(tmp_path / "s.toml")
    assert [v.name for v in sweep.variants] == [
        "dp-target_epsilon=1-method=prompt", "dp-target_epsilon=1-method=lora",
        "dp-target_epsilon=2.5-method=prompt", "dp-target_epsilon=2.5-method=lora", "off"]
    assert sweep.variants[3].overrides == ("privacy.sample.target_epsilon=2.5",
                                           "tuning.method=lora")


def test_finished_runs_are_reused_and_interrupted_ones_resumed(tmp_path, monkeypatch):
    import json
    import subprocess

    from fedtune.study import sweep as sweep_mod

    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(
        'name = "s"\nbase = "q.toml"\n[[run]]\nname = "a"\n[[run]]\nname = "b"\n'
        '[[run]]\nname = "c"\nset = ["seed=3"]\n')
    spec = load_sweep(tmp_path / "s.toml")
    out = tmp_path / "runs"
    (out / "a").mkdir(parents=True)
    (out / "a" / "summary.json").write_text(json.dumps({"final_accuracy": 0.9}))
    (out / "b").mkdir()
    (out / "b" / "checkpoint.safetensors").write_bytes(b"")
    (out / "c").mkdir()  # died before its first round: a config but no checkpoint
    (out / "c" / "config.toml").write_text("stale")
    launched = []

    class FakeProc:
        returncode = 0

        def __init__(self, args, **kwargs):
            launched.append(args[3:])
            folder = Path(args[args.index("--resume") + 1] if "--resume" in args
                          else args[args.index("--out") + 1])
            (folder / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    rows = sweep_mod.run_sweep(spec, out, poll_s=0)
    assert launched == [["run", "--resume", str(out / "b")],
                        ["run", str(spec.base), "--out", str(out / "c"), "--set", "seed=3"]]
    assert [(r["name"], r["final_accuracy"]) for r in rows] == [("a", 0.9), ("b", 0.5),
                                                                 ("c", 0.5)]
    # The unstarted attempt was set aside, not written into (fedtune run refuses that).
    assert (out / "c.unstarted-1" / "config.toml").read_text() == "stale"
    assert not (out / "c" / "config.toml").exists()


@pytest.mark.parametrize("value", ["lora", "a b", 3, 2.5, float("inf"), True,
                                   [1, "x"], [{"name": "el2n_pruning", "keep": 0.5}]])
def test_grid_values_read_back_through_set(value):
    from fedtune.config import parse_override
    from fedtune.study.sweep import _toml

    assert parse_override(f"k={_toml(value)}") == ("k", value)


@pytest.mark.parametrize("name", ["dp_levels", "privacy_utility", "pruning", "expansion",
                                  "split"])
def test_every_committed_sweep_file_loads(name):
    path = ROOT / "experiments" / f"{name}.toml"
    if "[[run]]" not in path.read_text():
        pytest.skip(f"{path.name} is an experiment, not a sweep")
    sweep = load_sweep(path)
    assert sweep.variants and all(v.name for v in sweep.variants)


@pytest.mark.parametrize("name", ["../escape", "..", ".", "a/b", "a\\\\b", "", "/abs",
                                  "tab\\there"])
def test_run_names_must_be_one_safe_folder_name(tmp_path, name):
    # A run named "../x" was run into a folder outside --out.
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(f'name = "s"\nbase = "q.toml"\n[[run]]\nname = "{name}"\n')
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "s.toml")
    message = str(info.value)
    assert "must be a single folder name" in message and "\n" not in message


def test_sweep_name_must_be_one_safe_folder_name(tmp_path):
    # The sweep's name is the default output folder, runs/<name>.
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text('name = "../../tmp/x"\nbase = "q.toml"\n[[run]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"sweep name '../../tmp/x' must be a single folder"):
        load_sweep(tmp_path / "s.toml")


def test_grid_values_with_path_separators_stay_inside_out(tmp_path):
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(
        'name = "s"\nbase = "q.toml"\n[[run]]\nname = "m"\n'
        'grid = {"model.backbone" = ["../models/a", "/opt/b"]}\n')
    names = [v.name for v in load_sweep(tmp_path / "s.toml").variants]
    assert names == ['m-backbone=".._models_a"', 'm-backbone="_opt_b"']
    for name in names:
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_a_restarted_variant_keeps_the_spend_its_dead_attempt_recorded(tmp_path, monkeypatch):
    """A variant killed before any checkpoint existed (an older fedtune, or a checkpoint
    lost) left `privacy_pending.json`: the sweep sets the folder aside and starts afresh,
    carrying the charges into the new folder, where the new run charges them."""
    import json
    import subprocess
    from types import SimpleNamespace

    import numpy as np

    from fedtune.config import load_config
    from fedtune.privacy import DPHistory, planned_release
    from fedtune.privacy.plan import PrivacyPlan
    from fedtune.run import checkpoint
    from fedtune.study import sweep as sweep_mod
    from strategies.privacy_ledger import PrivacyLedger

    assert sweep_mod.PENDING_FILE == checkpoint.PENDING_FILE
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text('name = "s"\nbase = "q.toml"\n[[run]]\nname = "d"\n')
    spec = load_sweep(tmp_path / "s.toml")
    out = tmp_path / "runs"
    (out / "d").mkdir(parents=True)
    (out / "d" / "config.toml").write_text("stale")
    attempt = {"0": [[1.2, 0.25, 10]], "3": [[1.3, 0.5, 10]]}
    checkpoint.save_pending(out / "d", {"round": 1, "attempts": [attempt]})
    launched = []

    class FakeProc:
        returncode = 0

        def __init__(self, args, **kwargs):
            launched.append(args[3:])
            folder = Path(args[args.index("--out") + 1])
            # What the new run finds in its folder when its ledger starts.
            cfg = load_config(None, ["data.num_clients=4", "train.clients_per_round=2",
                                     "privacy.sample.noise_multiplier=1.0"])
            task = SimpleNamespace(partitions=[np.arange(50)] * 4)
            state = checkpoint.ServerState(round=0, vector=np.zeros(1, np.float32),
                                           spec_hash="x", initial={})
            sizes = [len(p) for p in task.partitions]
            PrivacyLedger(PrivacyPlan.of(cfg), sizes, state, folder).charge_sent(1, [0, 1])
            (folder / "summary.json").write_text(json.dumps({
                "charged": {str(k): v.to_lists() for k, v in state.client_dp.items()},
                "interrupted": state.interrupted,
                "planned": list(planned_release(cfg, 50))}))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    (row,) = sweep_mod.run_sweep(spec, out, poll_s=0)
    assert launched == [["run", str(spec.base), "--out", str(out / "d")]]
    assert (out / "d.unstarted-1" / "config.toml").read_text() == "stale"
    assert "carried 1 unfinished attempt(s) at round 1" in (out / "d" / "sweep.log").read_text()
    planned = tuple(row["planned"])
    assert row["interrupted"] == [{"round": 1, "partition_ids": [0, 3]}]
    assert row["charged"] == {"0": DPHistory([(1.2, 0.25, 10), planned]).to_lists(),
                              "1": DPHistory([planned]).to_lists(),
                              "3": DPHistory([(1.3, 0.5, 10)]).to_lists()}
    # Both attempts stay on record in the new folder until round 1 completes there.
    assert len(checkpoint.load_pending(out / "d")["attempts"]) == 2


def test_a_folder_without_checkpoint_with_later_charges_is_refused_not_dropped(
        tmp_path, monkeypatch):
    import subprocess

    from fedtune.run import checkpoint
    from fedtune.study import sweep as sweep_mod

    def launch(*args, **kwargs):
        raise AssertionError("the variant must not start")

    monkeypatch.setattr(subprocess, "Popen", launch)

    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text('name = "s"\nbase = "q.toml"\n[[run]]\nname = "d"\n')
    out = tmp_path / "runs"
    (out / "d").mkdir(parents=True)
    checkpoint.save_pending(out / "d", {"round": 3, "attempts": [{"0": [[1.0, 0.5, 2]]}]})
    with pytest.raises(RuntimeError, match="holds charges of round 3 but its folder has no "
                                           "checkpoint"):
        sweep_mod.run_sweep(load_sweep(tmp_path / "s.toml"), out, poll_s=0)
    assert (out / "d.unstarted-1" / "privacy_pending.json").exists()


# A sweep of causal-LM runs: the rows `run_sweep` returns for them (name, folder, summary),
# trimmed to what the table and the ranking read. Run a is better on validation, b on test.
LM_BASE = '[task]\nkind = "causal_lm"\n[data]\npartition = "iid"\n'
LM_SWEEP = ('name = "lm"\nbase = "base.toml"\n'
            '[[run]]\nname = "a"\nset = ["train.lr=0.001"]\n'
            '[[run]]\nname = "b"\nset = ["train.lr=0.01"]\n')
LM_SUMMARIES = {
    "a": {"final_val_perplexity": 40.0, "test_perplexity": 60.0},
    "b": {"final_val_perplexity": 50.0, "test_perplexity": 30.0},
}


def lm_row(name: str, folder: Path) -> dict:
    """What an LM run's summary.json gives a sweep (fedtune.task.kinds._lm_summary)."""
    return {"name": name, "folder": str(folder), "method": "lora", "rounds": 2,
            "epsilon_sample": None, "epsilon_user": None, "final_accuracy": None,
            "final_val_accuracy": None, "best_val_accuracy": None,
            "best_val_perplexity": LM_SUMMARIES[name]["final_val_perplexity"],
            **LM_SUMMARIES[name]}


def lm_sweep_file(tmp_path: Path) -> Path:
    (tmp_path / "base.toml").write_text(LM_BASE)
    (tmp_path / "s.toml").write_text(LM_SWEEP)
    return tmp_path / "s.toml"


def test_a_sweep_of_lm_runs_prints_its_table(tmp_path, monkeypatch, cli):
    """Invariant: `fedtune sweep` of causal-LM runs ends with its results table (a null
    final_accuracy is shown as absent), not a TypeError after every run has finished."""
    from fedtune.study import sweep as sweep_mod

    path = lm_sweep_file(tmp_path)
    out = tmp_path / "runs"
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda spec, out, **kw: [
        lm_row(v.name, out / v.name) for v in spec.variants])
    result = cli("sweep", str(path), "--out", str(out))
    assert result.code == 0, result.output


def test_an_lm_sweep_prints_perplexity_and_picks_on_validation(tmp_path, monkeypatch, cli):
    """The table and the ranking show the LM's figures (perplexity, lowest validation
    first): run a (validation 40, test 60) is picked over b (validation 50, test 30)."""
    from fedtune.study import sweep as sweep_mod

    path = lm_sweep_file(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda spec, out, **kw: [
        lm_row(v.name, out / v.name) for v in spec.variants])
    result = cli("sweep", str(path), "--out", str(tmp_path / "runs"))
    assert result.code == 0, result.output
    assert "val perplexity" in result.output and "test perplexity" in result.output
    ranking = result.output.split("settings by validation perplexity", 1)[1]
    assert "lowest" in ranking  # (the title may wrap)
    assert ranking.index("train.lr=0.001") < ranking.index("train.lr=0.01 ")
    assert ranking.index("40.00") < ranking.index("50.00")
    assert "best on validation: train.lr=0.001" in result.output


def test_a_sweep_mixing_task_kinds_is_refused_in_one_line(tmp_path):
    (tmp_path / "base.toml").write_text(LM_BASE)
    (tmp_path / "s.toml").write_text(
        'name = "mixed"\nbase = "base.toml"\n[[run]]\nname = "k"\n'
        'grid = {"task.kind" = ["causal_lm", "classification"]}\n')
    with pytest.raises(ConfigError, match="mix task kinds") as refused:
        load_sweep(tmp_path / "s.toml")
    assert "\n" not in str(refused.value)


def test_a_run_folder_whose_config_cannot_be_read_ends_the_table_in_one_line(
        tmp_path, monkeypatch, cli):
    """Invariant: bad input gets a one-line error. A variant's folder whose config.toml this
    fedtune cannot read (written by a newer one, or edited) ended a finished sweep with a
    traceback while marking its epsilon (seen when the code changed under a running sweep);
    sweep.json is written first, so the results stay."""
    from fedtune.study import sweep as sweep_mod

    path = lm_sweep_file(tmp_path)
    out = tmp_path / "runs"
    (out / "a").mkdir(parents=True)
    (out / "a" / "config.toml").write_text('[aggregation]\nfuture_key = "x"\n')
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda spec, out, **kw: [
        lm_row(v.name, out / v.name) for v in spec.variants])
    result = cli("sweep", str(path), "--out", str(out))
    said = " ".join(result.output.split())
    assert result.code != 0 and "Traceback" not in result.output, result.output
    assert "future_key" in said and str(out / "a" / "config.toml") in said, said
    assert (out / "sweep.json").is_file()

"""A sweep's settings are chosen on validation accuracy: seeds of one setting are averaged,
test accuracy never moves the ranking, and runs without a validation split are not ranked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.study.selection import rank_by_validation
from fedtune.study.sweep import Variant, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("train.rounds=3",)


def _variants(*lrs):
    return [Variant(f"lr-lr={lr}-seed={s}", (*SHARED, f"train.lr={lr}", f"seed={s}"))
            for lr in lrs for s in (0, 1)]


def _row(name, val, test):
    return {"name": name, "final_val_accuracy": val, "final_accuracy": test}


def test_the_best_mean_validation_accuracy_wins_whatever_the_test_accuracy():
    variants = _variants(0.3, 1.0)
    rows = [_row("lr-lr=0.3-seed=0", 0.80, 0.99), _row("lr-lr=0.3-seed=1", 0.82, 0.99),
            _row("lr-lr=1.0-seed=0", 0.90, 0.70), _row("lr-lr=1.0-seed=1", 0.86, 0.70)]
    best, second = rank_by_validation(variants, rows)
    assert best.settings == ("train.lr=1.0",) and best.label == "train.lr=1.0"
    assert best.runs == ("lr-lr=1.0-seed=0", "lr-lr=1.0-seed=1")
    assert best.val_score == pytest.approx(0.88) and best.test_score == 0.70
    assert second.val_score == pytest.approx(0.81)


def test_ties_keep_the_sweep_order():
    variants = _variants(3.0, 0.3)
    rows = [_row(v.name, 0.8, 0.8) for v in variants]
    assert [c.settings for c in rank_by_validation(variants, rows)] == [
        ("train.lr=3.0",), ("train.lr=0.3",)]


def test_runs_without_a_validation_split_are_not_ranked():
    variants = _variants(0.3, 1.0)
    rows = [_row(v.name, None if "0.3" in v.name else 0.7, 0.9) for v in variants]
    assert [c.settings for c in rank_by_validation(variants, rows)] == [("train.lr=1.0",)]
    assert rank_by_validation(variants, [_row(v.name, None, 0.9) for v in variants]) == []


def test_a_later_override_of_the_same_key_is_the_one_that_counts():
    variants = [Variant("a", ("train.lr=1.0", "train.lr=0.3")), Variant("b", ("train.lr=1.0",))]
    rows = [_row("a", 0.9, 0.5), _row("b", 0.8, 0.5)]
    assert rank_by_validation(variants, rows)[0].settings == ("train.lr=0.3",)


def test_tune_defaults_sweep_loads_and_varies_only_what_it_tunes():
    sweep = load_sweep(ROOT / "experiments/tune_defaults.toml")
    keys = {item.split("=", 1)[0] for v in sweep.variants for item in v.overrides}
    assert {"train.lr", "tuning.prompt.lr_scale"} <= keys
    assert not any(k.startswith("data.validation_fraction") for k in keys)
    rows = [_row(v.name, 0.5, 0.5) for v in sweep.variants]
    ranked = rank_by_validation(sweep.variants, rows)
    assert ranked and all("seed=" not in s for c in ranked for s in c.settings)


def test_sweep_table_shows_validation_and_names_the_setting_it_picks(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'name = "s"\nbase = "{ROOT / "experiments/quickstart.toml"}"\n'
                     '[[run]]\nname = "lr"\ngrid = {"train.lr" = [0.3, 3.0], "seed" = [0, 1]}\n')
    figures = {"lr-lr=0.3-seed=0": (0.81, 0.95), "lr-lr=0.3-seed=1": (0.83, 0.95),
               "lr-lr=3.0-seed=0": (0.90, 0.80), "lr-lr=3.0-seed=1": (0.88, 0.80)}
    for name, (val, test) in figures.items():  # finished runs: the sweep reuses them
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "summary.json").write_text(json.dumps({
            "final_val_accuracy": val, "final_accuracy": test, "method": "prompt",
            "epsilon_sample": 7.9, "epsilon_user": None, "rounds": 8}))
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "sweep", str(sweep), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val accuracy" in proc.stdout and "0.8100" in proc.stdout
    assert "best on validation: train.lr=3.0" in proc.stdout


def test_an_lm_sweep_chooses_its_settings_on_validation_perplexity(tmp_path):
    """Invariant: settings of an LM sweep are ranked on the validation split (lowest final
    validation perplexity first), never on test perplexity, as a classifier's are on
    validation accuracy."""
    from tests.test_sweep import lm_row, lm_sweep_file

    spec = load_sweep(lm_sweep_file(tmp_path))
    rows = [lm_row(v.name, tmp_path / v.name) for v in spec.variants]
    ranked = rank_by_validation(spec.variants, rows)
    assert ranked, "no candidate: an LM sweep's settings are chosen on nothing"
    assert ranked[0].settings == ("train.lr=0.001",), [c.settings for c in ranked]

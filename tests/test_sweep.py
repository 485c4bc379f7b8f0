"""Sweep files: parsed, every variant validated before anything runs."""

from pathlib import Path

import pytest

from fedtune.config import ConfigError
from fedtune.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_privacy_utility_sweep_loads_all_variants():
    sweep = load_sweep(ROOT / "experiments/privacy_utility.toml")
    assert sweep.base == ROOT / "experiments/quickstart.toml"
    names = [v.name for v in sweep.variants]
    assert names == ["no-dp", "sample-eps1", "sample-eps3", "sample-eps8",
                     "user-eps1", "user-eps3", "user-eps8"]


@pytest.mark.parametrize("body,message", [
    ('name = "s"\nbase = "q.toml"', "needs at least one [[run]]"),
    ('name = "s"\nbase = "q.toml"\ncolour = 1\n[[run]]\nname = "a"', "unknown keys ['colour']"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "a"\n[[run]]\nname = "a"', "names repeat"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "a"\nset = [1]', "`set` list of key=value"),
    ('name = "s"\nbase = "q.toml"\n[[run]]\nname = "bad"\nset = ["train.rounds=0"]',
     "run 'bad': train.rounds must be > 0"),
])
def test_bad_sweeps_are_refused_before_any_run(tmp_path, body, message):
    (tmp_path / "q.toml").write_text((ROOT / "experiments/quickstart.toml").read_text())
    (tmp_path / "s.toml").write_text(body + "\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(tmp_path / "s.toml")

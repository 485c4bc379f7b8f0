"""ATTACK34: `aggregation.norm_bound` is capped at 1e6 (issue 27) and a number past the cap is
refused in one line, but an integer past float's range (a TOML integer literal of 310 digits
or more) reaches `require_finite` (`math.isfinite`) as a Python int and raises
OverflowError: `--set`, a config file and a sweep's `set` list all end in a traceback
instead of the one-line refusal. The same hole is in every float key (fedtune/config/load.py
`_coerce` calls `require_finite(key, value)` before `float(value)`)."""

import pytest
from config_refusals import refusal

from fedtune.config import ConfigError, load_config
from fedtune.study.sweep import load_sweep

# An integer no float holds: math.isfinite and float() raise OverflowError on it.
HUGE = "1" + "0" * 400


@pytest.mark.parametrize("key", ["aggregation.norm_bound", "aggregation.adaptive_factor",
                                 "train.lr"])
def test_an_integer_past_floats_range_is_refused_in_one_line_by_set(key):
    """Adversary: none (a user's --set value); breaks THREATS 8: OverflowError, not one line."""
    assert key in refusal([f"{key}={HUGE}"])


def test_an_integer_past_floats_range_in_a_config_file_is_refused_in_one_line(tmp_path):
    """Adversary: none (a config file's value); breaks THREATS 8: OverflowError, not one line."""
    path = tmp_path / "c.toml"
    path.write_text(f"[aggregation]\nnorm_bound = {HUGE}\n")
    with pytest.raises(ConfigError, match="aggregation.norm_bound"):
        load_config(path)


def test_an_integer_past_floats_range_in_a_sweep_is_refused_in_one_line(tmp_path):
    """Adversary: none (a sweep row's value); breaks THREATS 8: OverflowError, not one line."""
    (tmp_path / "base.toml").write_text("")
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "s"\nbase = "base.toml"\n[[run]]\nname = "a"\n'
                     f'set = ["aggregation.norm_bound={HUGE}"]\n')
    with pytest.raises(ConfigError, match="aggregation.norm_bound"):
        load_sweep(sweep)


def test_fedtune_run_refuses_it_without_a_traceback(cli, tmp_path):
    """Adversary: none (`fedtune run --set`); breaks THREATS 8: a traceback, not one line."""
    code, _, out = cli("run", "--set", f"aggregation.norm_bound={HUGE}",
                       "--out", str(tmp_path / "run"))
    assert code != 0 and "aggregation.norm_bound" in out
    assert not (tmp_path / "run").exists()

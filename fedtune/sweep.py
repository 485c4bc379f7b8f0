"""A sweep: named variants of one experiment, each run into its own folder.

A sweep file is TOML:

    name = "privacy_utility"
    base = "quickstart.toml"          # experiment config, relative to this file
    [[run]]
    name = "sample-eps1"
    set = ["privacy.sample.target_epsilon=1"]

Every variant is checked (config loads) before the first one starts. A variant whose
folder already holds a summary.json is not run again, so an interrupted sweep resumes;
one with a checkpoint but no summary is resumed from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, load_config
from fedtune.ledger import SUMMARY_FILE


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    variants: tuple[Variant, ...]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"name", "base", "run"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: name, base, run")
    if not isinstance(raw.get("name"), str) or not isinstance(raw.get("base"), str):
        raise ConfigError(f"{path}: needs `name` and `base` (an experiment file) as strings")
    runs = raw.get("run")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: needs at least one [[run]] with a name and a set list")
    variants = []
    for i, run in enumerate(runs):
        if (not isinstance(run, dict) or set(run) - {"name", "set"}
                or not isinstance(run.get("name"), str)
                or not isinstance(run.get("set", []), list)
                or not all(isinstance(x, str) for x in run.get("set", []))):
            raise ConfigError(f"{path}: run {i + 1} must have a `name` string and a `set` "
                              "list of key=value strings")
        variants.append(Variant(run["name"], tuple(run.get("set", []))))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: run names repeat: {names}")
    sweep = Sweep(raw["name"], (path.parent / raw["base"]).resolve(), tuple(variants))
    for variant in sweep.variants:
        try:
            load_config(sweep.base, list(variant.overrides))
        except ConfigError as exc:
            raise ConfigError(f"{path}: run {variant.name!r}: {exc}") from None
    return sweep


def run_sweep(sweep: Sweep, out: Path, on_start=None) -> list[dict[str, Any]]:
    """Run (or resume, or reuse) every variant into `out/<name>`; returns one row each."""
    rows = []
    for variant in sweep.variants:
        folder = out / variant.name
        if not (folder / SUMMARY_FILE).exists():
            if on_start is not None:
                on_start(variant, folder)
            if (folder / "checkpoint.safetensors").exists():
                args = ["run", "--resume", str(folder)]
            else:
                args = ["run", str(sweep.base), "--out", str(folder)]
                for item in variant.overrides:
                    args += ["--set", item]
            # One process per variant: each gets a fresh Ray runtime.
            proc = subprocess.run([sys.executable, "-m", "fedtune.cli", *args])
            if proc.returncode != 0:
                raise RuntimeError(f"sweep {sweep.name}: run {variant.name!r} failed "
                                   f"(exit {proc.returncode}); see its output above")
        rows.append({"name": variant.name, "folder": str(folder),
                     **json.loads((folder / SUMMARY_FILE).read_text())})
    return rows

"""A sweep: named variants of one experiment, each run into its own folder.

A sweep file is TOML:

    name = "privacy_utility"
    base = "quickstart.toml"          # experiment config, relative to this file
    set = ["model.max_length=32"]     # optional: overrides every run starts from
    [[run]]
    name = "dp"
    set = ["privacy.sample.enabled=true"]
    grid = {"privacy.sample.target_epsilon" = [1, 8], "seed" = [0, 1]}

A run with a `grid` expands into one variant per combination of the grid's values (in
the order written), named `dp-target_epsilon=1-seed=0` and so on. Every variant is checked
(config loads) before the first one starts. A variant whose
folder already holds a summary.json is not run again, so an interrupted sweep resumes;
one with a checkpoint but no summary is resumed from it (a run writes its first checkpoint
before round 1 is charged or sent, so a variant killed in round 1 is resumed too). A folder
without a checkpoint is set aside and the variant started afresh; DP charges it recorded
(`privacy_pending.json`, from a run killed before a checkpoint existed) are carried into the
new folder, where the new run charges them, and `sweep.log` says so: spend is never dropped.
A sweep never writes through a symlink: its folder or a variant's that is (or holds) one is
refused before anything runs, and `sweep.log` is opened with O_NOFOLLOW.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from fedtune.config import ConfigError, load_config, read_toml
from fedtune.run.atomic import open_append
from fedtune.run.folder import (
    CHECKPOINT_FILE,
    PENDING_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    SWEEP_LOG,
    RunFolderError,
    refuse_links,
)
from fedtune.run.ledger import count_rounds


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    # Its config's `[task] kind`: what its quality figure is (set by `load_sweep`).
    task_kind: str = "classification"


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    variants: tuple[Variant, ...]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = read_toml(path, "sweep file")
    unknown = sorted(set(raw) - {"name", "base", "set", "run"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: name, base, set, run")
    if not isinstance(raw.get("name"), str) or not isinstance(raw.get("base"), str):
        raise ConfigError(f"{path}: needs `name` and `base` (an experiment file) as strings")
    check_folder_name(raw["name"], f"{path}: sweep name")
    shared = raw.get("set", [])
    if not isinstance(shared, list) or not all(isinstance(x, str) for x in shared):
        raise ConfigError(f"{path}: top-level `set` must be a list of key=value strings")
    runs = raw.get("run")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: needs at least one [[run]] with a name and a set list")
    variants = []
    for i, run in enumerate(runs):
        if (not isinstance(run, dict) or set(run) - {"name", "set", "grid"}
                or not isinstance(run.get("name"), str)
                or not isinstance(run.get("set", []), list)
                or not all(isinstance(x, str) for x in run.get("set", []))):
            raise ConfigError(f"{path}: run {i + 1} must have a `name` string, a `set` "
                              "list of key=value strings and optionally a `grid` table")
        variants += expand(run["name"], (*shared, *run.get("set", [])), run.get("grid", {}),
                           f"{path}: run {run['name']!r}")
    names = [v.name for v in variants]
    for variant in variants:
        check_folder_name(variant.name, f"{path}: run name")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: run names repeat: {names}")
    base = (path.parent / raw["base"]).resolve()
    checked = []
    for variant in variants:
        try:
            kind = load_config(base, list(variant.overrides)).task.kind
        except ConfigError as exc:
            raise ConfigError(f"{path}: run {variant.name!r}: {exc}") from None
        checked.append(replace(variant, task_kind=kind))
    kinds = sorted({v.task_kind for v in checked})
    if len(kinds) > 1:  # accuracy and perplexity rank nothing together
        raise ConfigError(f"{path}: the runs mix task kinds {kinds}: a sweep chooses among "
                          "runs of one task.kind; make one sweep per kind")
    return Sweep(raw["name"], base, tuple(checked))


def expand(name: str, overrides: tuple[str, ...], grid: object, where: str) -> list[Variant]:
    """One variant per combination of the grid's values; keys vary slowest first."""
    if not isinstance(grid, dict) or not all(
            isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}: `grid` must map config keys to non-empty value lists")
    if not grid:
        return [Variant(name, overrides)]
    keys = list(grid)
    variants = []
    for values in itertools.product(*(grid[k] for k in keys)):
        # A value may be a path (a backbone folder): its separators must not nest folders.
        label = "-".join(f"{k.rsplit('.', 1)[-1]}={_toml(v)}" for k, v in zip(keys, values,
                                                                            strict=True))
        label = label.replace("/", "_").replace("\\", "_")
        sets = tuple(f"{k}={_toml(v)}" for k, v in zip(keys, values, strict=True))
        variants.append(Variant(f"{name}-{label}", overrides + sets))
    return variants


def _toml(value: object, top: bool = True) -> str:
    """`value` as `--set key=value` parses it back: a TOML inline value, except that a
    plain word may stay unquoted at the top level (it reads back as that string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = top and value.replace("_", "").replace("-", "").isalnum()
        return value if plain else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, top=False) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v, top=False)}" for k, v in value.items()) + "}"
    return repr(value)


def check_folder_name(name: str, what: str) -> None:
    """`name` becomes a folder under the sweep's output: one path component that cannot
    leave it (no separator, not "." or "..") and that a shell prints on one line."""
    if (name in ("", ".", "..") or "/" in name or "\\" in name
            or any(not ch.isprintable() for ch in name) or len(name.encode()) > 255):
        raise ConfigError(f"{what} {name!r} must be a single folder name: not empty, "
                          "'.' or '..', no '/' or '\\', printable, at most 255 bytes")


class Monitor(Protocol):
    """What a sweep reports while it runs (the CLI draws it as one progress view)."""

    def started(self, variant: Variant, folder: Path) -> None: ...
    def progressed(self, variant: Variant, rounds_done: int) -> None: ...
    def finished(self, variant: Variant, ok: bool) -> None: ...




def run_sweep(sweep: Sweep, out: Path, parallel: int = 1, monitor: Monitor | None = None,
              poll_s: float = 2.0) -> list[dict[str, Any]]:
    """Run (or resume, or reuse) every variant into `out/<name>`, `parallel` at a time,
    each in its own process (own Ray runtime) with its output in `<name>/sweep.log`.
    Returns one row per variant: its name, folder and summary."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    _refuse_links(out, top_only=True)
    pending = [v for v in sweep.variants if not (out / v.name / SUMMARY_FILE).exists()]
    for variant in pending:  # all refused before the first starts, and each again at its start
        _refuse_links(out / variant.name)
    cpus = max(1, (os.cpu_count() or 1) // parallel)
    running: dict[str, tuple[Variant, subprocess.Popen]] = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < parallel:
            variant = pending.pop(0)
            folder = out / variant.name
            _refuse_links(folder)
            carried = _set_aside_unstarted(folder)
            folder.mkdir(parents=True, exist_ok=True)
            if carried is not None:
                _carry_pending(carried, folder)
            if monitor is not None:
                monitor.started(variant, folder)
            running[variant.name] = (variant, _launch(sweep, variant, folder, parallel, cpus))
        time.sleep(poll_s)
        for name, (variant, proc) in list(running.items()):
            if monitor is not None:
                monitor.progressed(variant, count_rounds(out / name))
            if proc.poll() is None:
                continue
            del running[name]
            ok = proc.returncode == 0 and (out / name / SUMMARY_FILE).exists()
            if not ok:
                failed.append(f"{name} (exit {proc.returncode}, see {out / name / SWEEP_LOG})")
            if monitor is not None:
                monitor.finished(variant, ok)
    if failed:
        raise RuntimeError(f"sweep {sweep.name}: {len(failed)} run(s) failed: "
                           + "; ".join(failed))
    return [{"name": v.name, "folder": str(out / v.name),
             **json.loads((out / v.name / SUMMARY_FILE).read_text())} for v in sweep.variants]




def _set_aside_unstarted(folder: Path) -> Path | None:
    """A variant that died before its first checkpoint left run files but no checkpoint:
    `fedtune run` never writes into such a folder, so move it to `<name>.unstarted-<n>`
    (kept as it is) and start the variant afresh. Returns the moved folder when it holds DP
    charges the server had already made (`privacy_pending.json`), to be carried over."""
    if not folder.is_dir() or (folder / CHECKPOINT_FILE).exists():
        return None
    if not any((folder / name).exists() for name in (*RUN_FILES, PENDING_FILE)):
        return None
    n = 1
    while (aside := folder.with_name(f"{folder.name}.unstarted-{n}")).exists():
        n += 1
    folder.rename(aside)
    return aside if (aside / PENDING_FILE).exists() else None


def _carry_pending(aside: Path, folder: Path) -> None:
    """Carry the set-aside attempt's round-1 charges into the variant's new folder (written
    durably before the new run starts): the new run charges them as an interrupted round
    (`strategies.privacy_ledger`), so its epsilons include the releases the dead attempt may
    have made. Charges of a later round cannot belong to a folder without a checkpoint (it
    was edited): refused rather than dropped."""
    from fedtune.run.checkpoint import load_pending, save_pending  # torch: only on this path

    pending = load_pending(aside)
    if pending is None or pending.get("round") != 1:
        raise RuntimeError(
            f"{aside / PENDING_FILE} holds charges of round {(pending or {}).get('round')!r} "
            "but its folder has no checkpoint: it was edited; restore the checkpoint or "
            "resume that folder by hand")
    save_pending(folder, pending)
    with open_append(folder / SWEEP_LOG) as log:
        log.write(f"sweep: carried {len(pending['attempts'])} unfinished attempt(s) at round 1 "
                  f"from {aside} ({PENDING_FILE}); the new run charges them\n")


def _launch(sweep: Sweep, variant: Variant, folder: Path, parallel: int, cpus: int
            ) -> subprocess.Popen:
    if (folder / CHECKPOINT_FILE).exists():
        args = ["run", "--resume", str(folder)]
    else:
        args = ["run", str(sweep.base), "--out", str(folder)]
        for item in variant.overrides:
            args += ["--set", item]
        if parallel > 1:  # share the cores instead of each run claiming all of them
            args += ["--set", f"simulation.num_cpus={cpus}"]
    with open_append(folder / SWEEP_LOG) as log:  # the child keeps its own copy of the fd
        return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT)


def _refuse_links(folder: Path, top_only: bool = False) -> None:
    """A sweep never writes through a link (THREATS.md 7): its --out and a variant's folder
    must not be links, nor hold one anywhere (a bounded walk, as `fedtune run --out` is
    checked); the logs are also opened without following links (`open_append`)."""
    if folder.is_symlink():
        raise RuntimeError(f"sweep folder {folder} is a symlink; a sweep never writes "
                           "through a link: give the real folder")
    if top_only or not folder.is_dir():
        return
    try:
        refuse_links(folder, "sweep folder")
    except RunFolderError as exc:
        raise RuntimeError(str(exc)) from None

"""Golden runs: the same tiny experiments give the same figures, bit for bit, before and
after a change that should not change what a run computes (issue 28's restructure).

What: five real `fedtune run`s through the simulation in `privacy.reproducible_noise` mode
(every DP draw seeded from the config's seed, so a run folder re-runs to the same numbers):
the quickstart, the split experiment, user-level DP, and the two strategy-plugin experiments
(population expansion, EL2N pruning), each shrunk by `--set` overrides to a few clients,
rounds and steps. Per run it records every figure of each `rounds.jsonl` record, of
`summary.json` and of `curator_log.jsonl` (flattened to `path -> value`), except the few that
differ between two runs of the same code (`VARYING`), plus a SHA-256 of the final global
vector (the checkpoint's `vector` array) and of the exported final state's arrays and metadata.

Why: the figures are compared exactly (floats as JSON writes them, which round-trips), so a
refactor that changes one summation order, one draw or one default shows up here.

How (the CLI runs as a subprocess with this interpreter and this PYTHONPATH, so it tests
whatever tree is on the path; each run takes `flock /tmp/fedtune-e2e.lock` on its own):

    python benchmarks/golden.py --record               # this environment's record (--only)
    python benchmarks/golden.py                        # --check: compare, exit 1 on a diff
    python benchmarks/golden.py --only quickstart      # one case
    python benchmarks/golden.py --twice --record       # record only what re-runs identically
    python benchmarks/golden.py --out /tmp/g           # keep the run folders there

The figures hold for one set of library versions on one CPU kind and vendor (`environment()`):
`golden.json` holds one record per environment, `{"records": [{"environment", "cases"}, ...]}`.
`--check` (and tests/test_golden.py) compares with the record whose environment is this one's;
where none is, it skips and says why (the nearest record's differences), or with `--nearest`
compares with that record anyway (figures may differ for the environment alone). `--record`
adds this environment's record, or replaces its cases (`--only`: those), and keeps the
others. A file of the older one-record form (`{"environment", "cases"}`) reads as one record
and is written in the new form. Runs pin the driver's torch threads (`THREADS`): the
clients' count is the config's.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

from fedtune.task.kinds import ROUND_PERPLEXITY, SUMMARY_PERPLEXITY

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "benchmarks" / "golden.json"
LOCK = "/tmp/fedtune-e2e.lock"
EXPERIMENTS = ROOT / "experiments"
# The driver's (server's) torch thread count; clients use simulation.num_cpus_per_client.
# 1 and 2 gave identical figures on a 2-core machine; pinned so a bigger CI box does too.
THREADS = "1"
# Every case: few clients, 2 rounds of 2 steps, 32 tokens, 64 evaluation examples.
TINY = ["privacy.reproducible_noise=true", "data.num_clients=4", "train.clients_per_round=2",
        "train.rounds=2", "train.local_steps=2", "train.batch_size=16", "model.max_length=32",
        "tuning.prompt.length=4", "train.eval_max_examples=64"]
# name -> (experiment or sweep file, the sweep's [[run]] to take or None, extra overrides)
CASES: dict[str, tuple[str, str | None, list[str]]] = {
    "quickstart": ("quickstart.toml", None, []),
    # Split after layer 1, half the local steps on the local loss, DP-SGD on the deltas.
    "split": ("split.toml", "split-k1-local", []),
    # User-level DP (server clipping, calibrated seeded noise, seeded Poisson cohort, the
    # cohort in curator_log.jsonl), the target domain's clients only.
    "user_dp": ("target_population.toml", None, ["data.target_clients=4"]),
    # Population expansion, importance weighting, a domain head, under user-level DP.
    "expansion": ("expansion.toml", "expanded-importance",
                  ["data.num_clients=8", "data.target_clients=4", "train.clients_per_round=4"]),
    # EL2N pruning (keep half, one epoch of the kept examples), split after layer 1, no DP:
    # 24 clients keep each epoch to a few steps.
    "pruning": ("pruning.toml", "split-keep-0.5", ["data.num_clients=24"]),
}
# Keys (at any depth) whose values differ between two runs of the same code, left out (found
# by --twice on every case: nothing else differed). Dict order is not compared (`flatten`).
VARYING = {
    "wall_s": "a duration (perf_counter): machine load",
    "node": "a Flower node id: the simulation engine draws them at random per run",
}
# Packages whose versions change the figures; with the CPU's vector unit, the environment
# the golden figures hold for.
PACKAGES = ("torch", "numpy", "scipy", "opacus", "transformers", "tokenizers", "peft",
            "safetensors", "flwr", "flwr-datasets", "datasets", "dp-accounting")
RECORDS = ("rounds.jsonl", "summary.json", "curator_log.jsonl")
# The final global vector, and the exported state (arrays and metadata). The checkpoint's other
# arrays are the server process's RNG states and its metadata holds wall times: not results.
STATES = {"checkpoint.safetensors": ("vector",), "final_state.safetensors": None}


def environment() -> dict[str, str]:
    import torch

    env = {"machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
           "cpu_vendor": cpu_vendor(),
           "python": ".".join(platform.python_version_tuple()[:2])}
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "absent"
    return env


def cpu_vendor() -> str:
    """The CPU's vendor (/proc/cpuinfo's vendor_id on Linux): two CPUs of one capability
    (AVX512) from different vendors ran the same code to figures 1e-8 apart (an Intel Xeon
    against golden.json's AMD EPYC record, 2026-12-07), the BLAS kernels' summation order."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_differences(golden: dict[str, Any], now: dict[str, str] | None = None
                            ) -> list[str]:
    """What differs between a record's environment and `now` (this one's by default)."""
    now = environment() if now is None else now
    was = golden.get("environment", {})
    return [f"{k}: recorded {was.get(k)}, here {now.get(k)}"
            for k in sorted(set(now) | set(was)) if was.get(k) != now.get(k)]


def load_records(path: Path | None = None) -> list[dict[str, Any]]:
    """golden.json's records (`path`: another file), one per environment (none if there is
    no file). The older one-record form (`{"environment", "cases"}`) is a list of one."""
    path = GOLDEN if path is None else path
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if "records" in data:
        return list(data["records"])
    return [{"environment": data.get("environment", {}), "cases": data.get("cases", {})}]


def save_records(records: list[dict[str, Any]], path: Path | None = None) -> None:
    """Write `records` to golden.json (`path`: another file), each one's cases sorted."""
    path = GOLDEN if path is None else path
    records = [{"environment": r["environment"], "cases": dict(sorted(r["cases"].items()))}
               for r in records]
    path.write_text(json.dumps({"records": records}, indent=1) + "\n")


def matching_record(records: list[dict[str, Any]], now: dict[str, str] | None = None
                    ) -> dict[str, Any] | None:
    """The record whose environment is `now` (this one's by default), every key equal."""
    now = environment() if now is None else now
    return next((r for r in records if not environment_differences(r, now)), None)


def nearest_record(records: list[dict[str, Any]], now: dict[str, str] | None = None
                   ) -> dict[str, Any] | None:
    """The record whose environment differs from `now` in the fewest keys."""
    now = environment() if now is None else now
    return min(records, key=lambda r: len(environment_differences(r, now)), default=None)


def no_record_reason(records: list[dict[str, Any]], now: dict[str, str] | None = None) -> str:
    """Why no record holds `now`'s figures, in one line: the nearest record's differences."""
    now = environment() if now is None else now
    nearest = nearest_record(records, now)
    if nearest is None:
        return f"{GOLDEN.name} holds no record"
    differences = "; ".join(environment_differences(nearest, now))
    return (f"{GOLDEN.name} holds no record for this environment ({len(records)} "
            f"record(s); the nearest differs in {differences})")


def with_record(records: list[dict[str, Any]], now: dict[str, str],
                cases: dict[str, Any]) -> list[dict[str, Any]]:
    """`records` with `cases` put into `now`'s record (added where there is none; a case
    already there replaced, its other cases kept); every other record as it was."""
    out, placed = [], False
    for record in records:
        if not placed and not environment_differences(record, now):
            record = {"environment": dict(now), "cases": {**record["cases"], **cases}}
            placed = True
        out.append(record)
    return out if placed else [*out, {"environment": dict(now), "cases": dict(cases)}]


def experiment(name: str) -> tuple[Path, list[str]]:
    """The case's experiment file and overrides: a sweep's [[run]] becomes its base file
    with the sweep's and the run's `set` (and each `grid` key's first value), then TINY and
    the case's own overrides (later ones win)."""
    file, variant, extra = CASES[name]
    path, sets = EXPERIMENTS / file, []
    if variant is not None:
        sweep = tomllib.loads(path.read_text())
        run = next(r for r in sweep["run"] if r["name"] == variant)
        sets = [*sweep.get("set", []), *run.get("set", []),
                *(f"{k}={json.dumps(v[0])}" for k, v in run.get("grid", {}).items())]
        path = (path.parent / sweep["base"]).resolve()
    return path, [*sets, *TINY, *extra]


@contextmanager
def e2e_lock():
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_case(name: str, out: Path, lock: bool = True) -> float:
    """`fedtune run` the case into `out`; returns its wall time (lock wait excluded)."""
    config, overrides = experiment(name)
    args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": THREADS,
           "MKL_NUM_THREADS": THREADS}
    with e2e_lock() if lock else nullcontext():
        started = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1200)
        took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: fedtune run failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            if key not in VARYING:
                flatten(item, f"{prefix}.{key}", out)
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def state_sha256(path: Path, names: tuple[str, ...] | None) -> str:
    """SHA-256 over a safetensors file's arrays (`names`, or all) as stored: each array's
    name, dtype, shape and raw bytes, then the file's metadata (all of it when every array is
    hashed; none otherwise: the checkpoint's holds wall times)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    meta = header.pop("__metadata__", {})
    digest = hashlib.sha256()
    for key in sorted(names or header):
        info = header[key]
        begin, end = info["data_offsets"]
        digest.update(f"{key}|{info['dtype']}|{info['shape']}|".encode())
        digest.update(raw[8 + size + begin:8 + size + end])
    if names is None:
        digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def figures(out: Path) -> dict[str, Any]:
    """Everything compared of one run folder."""
    flat: dict[str, Any] = {}
    for name in RECORDS:
        path = out / name
        if not path.exists():
            continue
        text = path.read_text()
        if name.endswith(".jsonl"):
            for i, line in enumerate(text.splitlines()):
                flatten(json.loads(line), f"{name}[{i}]", flat)
        else:
            flatten(json.loads(text), name, flat)
    for name, arrays in STATES.items():
        label = name if arrays is None else f"{name}:{','.join(arrays)}"
        flat[f"{label} sha256"] = state_sha256(out / name, arrays)
    return flat


# Record keys added after golden.json was recorded (issue 30: the majority-class
# baseline; issue 29: the causal-LM fields, null for a classifier): compared where
# golden.json holds them, not a difference where it predates them (`--record` pins them).
# Any other key new in a run is still a difference.
ADDED = {"majority_label", "majority_accuracy", "majority_val_accuracy",
         ROUND_PERPLEXITY, *SUMMARY_PERPLEXITY}


def diff(want: dict[str, Any], got: dict[str, Any], limit: int = 40) -> list[str]:
    lines = [f"  {k}: {want.get(k, '<missing>')!r} -> {got.get(k, '<missing>')!r}"
             for k in sorted(set(want) | set(got), key=str)
             if (k not in want and str(k).rsplit(".", 1)[-1] not in ADDED)
             or (k in want and (k not in got or json.dumps(want[k]) != json.dumps(got[k])))]
    return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit
                            else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true", help=f"write {GOLDEN.name}")
    mode.add_argument("--check", action="store_true", help="compare (the default)")
    parser.add_argument("--twice", action="store_true",
                        help="run each case twice, the two must agree (determinism); then "
                             "record or check the first")
    parser.add_argument("--only", choices=sorted(CASES), action="append",
                        help="run this case only (repeatable)")
    parser.add_argument("--out", type=Path, help="keep the run folders here")
    parser.add_argument("--no-lock", action="store_true",
                        help=f"do not take {LOCK} (the caller holds it, or runs nothing else)")
    parser.add_argument("--nearest", action="store_true",
                        help="with no record for this environment, check against the nearest "
                             "one (figures may differ for the environment alone)")
    args = parser.parse_args(argv)
    names = args.only or list(CASES)
    records, now = load_records(), environment()
    golden = matching_record(records, now)
    if not args.record:
        if golden is None and not (args.nearest and records):
            print(f"SKIPPED, nothing compared: {no_record_reason(records, now)}; run --record "
                  "to add this environment's record, or --nearest to compare anyway")
            return 0
        if golden is None:
            golden = nearest_record(records, now)
            assert golden is not None
            for line in environment_differences(golden, now):
                print(f"environment differs (figures may differ for that alone): {line}")
        if missing := [n for n in names if n not in golden["cases"]]:
            print(f"{GOLDEN}'s record for this environment has no figures for {missing}: "
                  "run --record first")
            return 1
    recorded: dict[str, Any] = {}
    temp = tempfile.TemporaryDirectory(prefix="golden-")
    root = args.out or Path(temp.name)
    failed = []
    for name in names:
        runs = []
        for attempt in range(2 if args.twice else 1):
            out = root / f"{name}-{attempt}"
            took = run_case(name, out, lock=not args.no_lock)
            print(f"{name}: ran in {took:.1f} s -> {out}", flush=True)
            runs.append(figures(out))
        if args.twice and (lines := diff(runs[0], runs[1])):
            failed.append(name)
            print(f"{name}: NOT DETERMINISTIC, {len(lines)} figure(s) differ between the two "
                  "runs:", *lines, sep="\n")
        elif args.record:
            recorded[name] = runs[0]
        elif golden is not None and (lines := diff(golden["cases"][name], runs[0])):
            failed.append(name)
            print(f"{name}: {len(lines)} figure(s) differ from {GOLDEN.name} "
                  "(recorded -> now):", *lines, sep="\n")
        else:
            print(f"{name}: {len(runs[0])} figures identical")
    temp.cleanup()
    if args.record and not failed:
        save_records(with_record(records, now, recorded))
        print(f"wrote {GOLDEN}: this environment's record "
              f"({', '.join(sorted(recorded))}), {len(records)} record(s) before")
    if failed:
        print(f"DIFFERENT: {failed}" + (" (nothing recorded)" if args.record else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

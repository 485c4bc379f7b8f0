"""Peak memory of `fedtune run` with 10, 100 and 1,000 virtual clients and the same cohort.

Each run is a child `python -m fedtune.cli run ...` process. A sampler in this process
walks the child's whole process tree every 0.2 s and sums the resident set size (RSS) of
every process in it:
- the driver (the `fedtune run` process: CLI, ServerApp, Flower's simulation engine),
- Ray's own processes started by the driver (gcs_server, raylet with its object store,
  the log monitor and agents; the dashboard is off),
- Ray's worker processes (the ClientApp actors, plus any idle prestarted workers).
The peak of that sum is the figure. RSS counts a page shared by several processes (the
memory-mapped token arrays, shared libraries) once per process, so the sum over-counts
what is shared; the proportional set size (PSS: a shared page split between its users),
sampled every second, is printed next to it.

The data is split IID (Dirichlet cannot give 1,000 clients of a few examples each their
minimum size), the cohort and the local work are the same for every population size, and
DP is off (with DP on, each client that trained keeps its DP history, a few numbers per
round it took part in). The script also checks, in every actor, that the token arrays are
memory-mapped from the on-disk cache (/proc/PID/maps) rather than copied in.

The last line is `ratio=X` = peak RSS sum with the largest population / with the smallest.

    python benchmarks/memory_scaling.py [--clients 10 100 1000] [--set key=value ...]
        [--markdown benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETS = [
    "data.partition=iid", "train.clients_per_round=4", "train.rounds=3",
    "train.local_steps=3", "train.batch_size=8", "model.max_length=64",
    "train.eval_max_examples=128", "privacy.sample.enabled=false",
    "privacy.user.enabled=false",
]
# Ray's own processes; its agents also run as "ray::...Agent" workers.
RAY_CORE = ("gcs_server", "raylet", "log_monitor", "dashboard", "Agent", "monitor.py",
            "runtime_env", "ray_client_server")


def _kind(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "worker"
    if any(name in cmd for name in RAY_CORE):
        return "ray core"
    if "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "worker"
    return "other"


def _pss(proc: psutil.Process) -> int:
    try:
        return int(getattr(proc.memory_full_info(), "pss", 0))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


class Sampler(threading.Thread):
    """Peak summed RSS (and PSS) of a process tree, by kind of process."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.period = pid, period
        self.stop = threading.Event()
        self.peak: dict[str, int] = {"total": 0}
        self.peak_pss = 0
        self.max_worker = 0
        self.token_maps: dict[int, bool] = {}
        self.actor_pids: set[int] = set()
        self._last_pss = 0.0

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def run(self) -> None:
        while not self.stop.is_set():
            procs = self.tree()
            sums: dict[str, int] = {"total": 0}
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                kind = _kind(proc, self.root)
                sums[kind] = sums.get(kind, 0) + rss
                sums["total"] += rss
                if kind == "worker":
                    self.max_worker = max(self.max_worker, rss)
                    self._check_maps(proc)
                    if self._is_actor(proc):
                        self.actor_pids.add(proc.pid)
            if sums["total"] > self.peak["total"]:
                self.peak = sums
            if time.monotonic() - self._last_pss >= 1.0:
                self._last_pss = time.monotonic()
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in procs))
            self.stop.wait(self.period)

    @staticmethod
    def _is_actor(proc: psutil.Process) -> bool:
        try:
            return "ClientAppActor" in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def _check_maps(self, proc: psutil.Process) -> None:
        """Whether this worker maps the token cache's .npy files (shared pages)."""
        if self.token_maps.get(proc.pid):
            return
        try:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return
        self.token_maps[proc.pid] = "/tokens/" in maps and "input_ids.npy" in maps


def run(n: int, sets: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    folder = out / f"clients-{n}"
    args = [sys.executable, "-m", "fedtune.cli", "run",
            str(ROOT / "experiments/quickstart.toml"), "--out", str(folder),
            "--set", f"data.num_clients={n}"]
    for item in sets:
        args += ["--set", item]
    t0 = time.perf_counter()
    log = out / f"clients-{n}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run with {n} clients failed; see {log}:\n{log.read_text()[-3000:]}")
    rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
    actors = sampler.actor_pids
    return {"n": n, "peak": sampler.peak, "peak_pss": sampler.peak_pss,
            "max_worker": sampler.max_worker, "total_s": time.perf_counter() - t0,
            "round_s": [r["wall_s"] for r in rounds],
            "workers_mapping_tokens": sum(sampler.token_maps.get(pid, False) for pid in actors),
            "workers_seen": len(actors), "load": _load_avg()}


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _mb(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    sets = DEFAULT_SETS + args.sets
    out = args.out or Path(tempfile.mkdtemp(prefix="memory-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"quickstart + {' '.join(sets)}; {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load avg {_load_avg()}",
          flush=True)
    rows = []
    for n in args.clients:
        r = run(n, sets, out, env)
        rows.append(r)
        p = r["peak"]
        print(f"{n:>5} clients: peak RSS sum {_mb(p['total'])} MB (driver "
              f"{_mb(p.get('driver', 0))}, ray core {_mb(p.get('ray core', 0))}, workers "
              f"{_mb(p.get('worker', 0))}, other {_mb(p.get('other', 0))}), peak PSS sum "
              f"{_mb(r['peak_pss'])} MB, largest worker {_mb(r['max_worker'])} MB; token "
              f"arrays mmapped in {r['workers_mapping_tokens']}/{r['workers_seen']} actors; "
              f"{r['total_s']:.1f} s, rounds {' '.join(f'{w:.2f}' for w in r['round_s'])} s; "
              f"load avg {r['load']}", flush=True)
    lines = ["| virtual clients | peak RSS sum MB | driver MB | Ray core MB | workers MB | "
             "peak PSS sum MB | run s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["peak"]
        lines.append(f"| {r['n']:,} | {_mb(p['total'])} | {_mb(p.get('driver', 0))} | "
                     f"{_mb(p.get('ray core', 0))} | {_mb(p.get('worker', 0))} | "
                     f"{_mb(r['peak_pss'])} | {r['total_s']:.0f} |")
    ratio = rows[-1]["peak"]["total"] / rows[0]["peak"]["total"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        sys.path.insert(0, str(Path(__file__).parent))
        from communication import write_section

        write_section(args.markdown, "memory_scaling", table + f"\n\nratio={ratio:.3f}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()

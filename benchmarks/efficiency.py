"""Fewer FLOPs per useful step: layer pruning and the frozen-prefix cache against the plain
methods, on the quickstart schedule (experiments/quickstart.toml).

Each row is a real `fedtune run` (a child `python -m fedtune.cli run ...` process), once
without DP and once at epsilon 8 (DP-SGD, the quickstart's privacy). Figures come from the
run folder and from a sampler of the child's process tree:
- client examples per second: examples the accepted clients trained on (rounds.jsonl,
  `per_client[].examples_seen`) over the rounds' wall time (`wall_s`: sending, client
  training, aggregation and the server's validation). Start-up is left out; a cached
  row's first-round cache fill is counted (each run starts with an empty prefix cache);
- peak RSS per actor: the largest resident set of any Ray worker process, sampled every
  0.2 s;
- final accuracy (summary.json, test split).
Every figure is also printed relative to the row's baseline (the unpruned, uncached
method, measured in the same invocation): prompt for the prompt rows and head-only, LoRA
for the LoRA rows.

Rows: prompt, prompt with 2 of 6 layers pruned, LoRA, LoRA with 2 of 6 pruned, a prompt at
block 3 with the cache, head-only with the cache; and a prompt at block 4 with the cache
(how far the late prompt must sit to pass 2.5x). The pruned rows need `model.prune_layers`
(fedtune.models.layer_pruning); where it is missing they fail with the config's message.

    python benchmarks/efficiency.py [--rows prompt prompt_l3_cache ...] [--privacy nodp eps8]
        [--set key=value ...] [--markdown FILE]
    python benchmarks/efficiency.py --step-speed [--steps 10] [--repeats 3]

`--step-speed` compares local DP-SGD training in one process instead: prompt at layer 0
against a prompt at block 3 from the cache (batch 32, max_length 64, one thread).

`--set` applies to every run (e.g. `--set train.rounds=2` for a quick check). Timings on a
shared machine are inflated by other load; the ratios, measured in one invocation, less so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedtune.run.epsilon_marks import folder_marks, render_epsilon

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "quickstart.toml"
PRUNE = 'model.prune_layers="importance:2"'  # 2 of MiniLM's 6 blocks


@dataclass(frozen=True)
class Row:
    name: str
    baseline: str  # the row whose figures this one is divided by
    sets: tuple[str, ...]


ROWS = {row.name: row for row in [
    Row("prompt", "prompt", ("tuning.method=prompt",)),
    Row("prompt_pruned", "prompt", ("tuning.method=prompt", PRUNE)),
    Row("lora", "lora", ("tuning.method=lora",)),
    Row("lora_pruned", "lora", ("tuning.method=lora", PRUNE)),
    Row("prompt_l3_cache", "prompt", ("tuning.method=prompt", "tuning.prompt.layer=3",
                                      "train.prefix_cache=on")),
    Row("head_cache", "prompt", ("tuning.method=head", "train.prefix_cache=on")),
    # Not one of the rows: a step from block 3 is at most 2x cheaper (3 of 6 blocks
    # still run forward and backward); from block 4 only 2 of 6 do.
    Row("prompt_l4_cache", "prompt", ("tuning.method=prompt", "tuning.prompt.layer=4",
                                      "train.prefix_cache=on")),
]}
PRIVACY = {
    "nodp": ("privacy.sample.enabled=false",),
    "eps8": ("privacy.sample.enabled=true", "privacy.sample.target_epsilon=8.0"),
}


@dataclass
class Result:
    row: str
    privacy: str
    ok: bool
    error: str = ""
    examples_per_s: float = 0.0
    # Examples per CPU second of the client workers (their start-up and cache fill
    # included): what other load on the machine cannot stretch, unlike wall time.
    examples_per_cpu_s: float = 0.0
    peak_actor_rss: int = 0
    accuracy: float = 0.0
    epsilon: float | None = None
    epsilon_shown: str = "-"  # with the run's marks (fedtune.run.epsilon_marks)
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ActorPeak:
    """Peak RSS of any Ray worker process under a root pid, and the CPU seconds the
    workers used (their last reading each), sampled in a thread."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    cmd = " ".join(proc.cmdline())
                    if "default_worker" in cmd or "ray::" in cmd and "Agent" not in cmd:
                        self.peak = max(self.peak, proc.memory_info().rss)
                        times = proc.cpu_times()
                        self.cpu[proc.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_one(row: Row, privacy: str, sets: list[str], work: Path) -> Result:
    out = work / f"{row.name}-{privacy}"
    cache = work / "cache"
    # Every run starts with an empty frozen-prefix cache (its fill is part of the cost);
    # the token cache next to it is shared.
    shutil.rmtree(cache / "prefix", ignore_errors=True)
    args = [sys.executable, "-m", "fedtune.cli", "run", str(CONFIG), "--out", str(out)]
    for item in (*row.sets, *PRIVACY[privacy], *sets):
        args += ["--set", item]
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    peak = ActorPeak(child.pid)
    output, _ = child.communicate()
    actor_rss = peak.stop()
    worker_cpu = sum(peak.cpu.values())
    if child.returncode != 0:
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["?"]
        return Result(row.name, privacy, ok=False, error=last[0][:200])
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()
              if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    seen = sum(c.get("examples_seen", 0) for r in rounds for c in r.get("per_client", []))
    wall = sum(r["wall_s"] for r in rounds)
    return Result(row.name, privacy, ok=True, examples_per_s=seen / wall if wall else 0.0,
                  examples_per_cpu_s=seen / worker_cpu if worker_cpu else 0.0,
                  peak_actor_rss=actor_rss, accuracy=summary["final_accuracy"],
                  epsilon=summary.get("epsilon_sample"),
                  epsilon_shown=render_epsilon(
                      summary.get("epsilon_sample"),
                      folder_marks(out, "sample", summary.get("epsilon_sample")), off="-"),
                  skipped=max((r.get("forward_layers_skipped", 0) for r in rounds),
                              default=0))


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def _versus(accuracy: float, base: float) -> str:
    return f"{accuracy - base:+.4f} ({accuracy / base:.3f}x)" if base else "n/a"


def table(results: list[Result]) -> list[str]:
    by = {(r.row, r.privacy): r for r in results}
    lines = ["| method | privacy | examples/s | rel. | examples/worker CPU s | rel. "
             "| peak RSS/actor MB | rel. | accuracy | vs base | epsilon | layers skipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = by.get((ROWS[r.row].baseline, r.privacy))
        if not r.ok:
            lines.append(f"| {r.row} | {r.privacy} | failed: {r.error} | | | | | | | | | |")
            continue
        ok = base is not None and base.ok
        eps = r.epsilon_shown
        lines.append(
            f"| {r.row} | {r.privacy} | {r.examples_per_s:.1f} | "
            f"{_ratio(r.examples_per_s, base.examples_per_s) if ok else 'n/a'} | "
            f"{r.examples_per_cpu_s:.1f} | "
            f"{_ratio(r.examples_per_cpu_s, base.examples_per_cpu_s) if ok else 'n/a'} | "
            f"{r.peak_actor_rss / 2**20:.0f} | "
            f"{_ratio(r.peak_actor_rss, base.peak_actor_rss) if ok else 'n/a'} | "
            f"{r.accuracy:.4f} | "
            f"{_versus(r.accuracy, base.accuracy) if ok else 'n/a'} | {eps} | {r.skipped} |")
    return lines


def step_speed(sets: list[str], steps: int, repeats: int, layer: int = 3) -> None:
    """Client examples per second of local DP-SGD training in this one process, prompt at
    layer 0 against a prompt at block 3 from the cache, interleaved A/B so that load
    from other processes hits both alike. One thread (a client actor's share), the
    quickstart's batch (32) and length (64), a real client partition. The cached row's
    one-off cache fill is timed and printed apart from its steps."""
    import torch

    from clients.train import local_train
    from fedtune.config import load_config
    from fedtune.privacy import DPHistory
    from fedtune.task.task import get_task
    from fedtune.tuning.prefix_cache import process_cache

    torch.set_num_threads(1)
    base = ["privacy.sample.enabled=true", f"train.local_steps={steps}", *sets]
    late = f"prompt@{layer}+cache"
    configs = {"prompt@0": load_config(CONFIG, base),
               late: load_config(CONFIG, [*base, f"tuning.prompt.layer={layer}",
                                          "train.prefix_cache=on"])}
    tasks = {name: get_task(cfg) for name, cfg in configs.items()}
    models = {name: task.new_model() for name, task in tasks.items()}
    data = tasks["prompt@0"].client_data(0)
    t0 = time.perf_counter()
    prefix = models[late].prefix
    process_cache(configs[late]).states(prefix, *data.tensors[:2])
    print(f"cache fill: {len(data)} examples through {layer} blocks in "
          f"{time.perf_counter() - t0:.2f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(repeats):
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            result = local_train(models[name], data, cfg, DPHistory(), seed=rep)
            rate = result.examples_seen / (time.perf_counter() - t0)
            rates[name].append(rate)
            print(f"{name:>15} rep {rep}: {rate:6.1f} examples/s "
                  f"({result.examples_seen} examples)", flush=True)
    best = {name: max(r) for name, r in rates.items()}
    pairs = [b / a for a, b in zip(rates["prompt@0"], rates[late], strict=True)]
    print(f"ratio {late} / prompt@0: best of {repeats} {best[late] / best['prompt@0']:.2f}, "
          f"per interleaved pair {', '.join(f'{r:.2f}' for r in pairs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-speed", action="store_true",
                        help="only the in-process step-speed comparison (no simulation)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=3, help="--step-speed: the late "
                        "prompt's block")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--privacy", nargs="+", default=list(PRIVACY), choices=list(PRIVACY))
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="override for every run, e.g. train.rounds=2")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    args = parser.parse_args()
    if args.step_speed:
        step_speed(args.sets, args.steps, args.repeats, args.layer)
        return
    # Baselines run first, so each row's relative figures exist when it is printed.
    names = sorted(set(args.rows) | {ROWS[n].baseline for n in args.rows},
                   key=list(ROWS).index)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedtune-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for privacy in args.privacy:
            for name in names:
                t0 = time.perf_counter()
                result = run_one(ROWS[name], privacy, args.sets, work)
                results.append(result)
                state = "ok" if result.ok else f"FAILED: {result.error}"
                print(f"{name:>16} {privacy}: {time.perf_counter() - t0:6.1f} s {state}",
                      flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    lines = table(results)
    print("\n".join(lines))
    if args.markdown:
        with args.markdown.open("a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

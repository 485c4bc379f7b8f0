"""Cost of a DP-SGD step relative to a plain step, per tuning method and grad_sample_mode.

One process measures everything on the same fixed batch (quickstart shapes: batch 32, 64
tokens, real SpamAssassin text, the bundled MiniLM), with torch limited to the threads a
virtual client gets (`simulation.num_cpus_per_client`, 1 by default). A DP step is
Opacus' per-sample gradients + per-sample clipping + noise + the optimiser step; the plain
step is forward + backward + step. Blocks of steps alternate between configurations so
drift on the machine hits all of them alike; the median block time per step is reported.

    python benchmarks/dp_overhead.py [--methods prompt lora] [--steps 10] [--blocks 5]
        [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.config import GRAD_SAMPLE_MODES, SampleDPConfig, load_config
from fedtune.privacy import make_private
from fedtune.runtime.torch_setup import configure_torch
from fedtune.task.task import get_task

ROOT = Path(__file__).resolve().parents[1]
Step = Callable[[], None]


def plain_step(method: str, batch: tuple[torch.Tensor, ...]) -> Step:
    task = _task(method)
    model = task.new_model()
    model.train()
    optimizer = torch.optim.SGD(model.param_groups(0.01))
    ids, mask, labels = batch
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(ids, mask), labels).backward()
        optimizer.step()

    return step


def dp_step(method: str, batch: tuple[torch.Tensor, ...], mode: str) -> Step:
    task = _task(method)
    model = task.new_model()
    optimizer = torch.optim.SGD(model.param_groups(0.01))
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[2]))
    private = make_private(model, optimizer, loader, SampleDPConfig(grad_sample_mode=mode),
                           noise_multiplier=1.0)
    ids, mask, labels = batch

    def step() -> None:
        private.optimizer.zero_grad(set_to_none=True)
        private.criterion(private.model(ids, mask), labels).backward()
        private.optimizer.step()

    return step


def _task(method: str):
    return get_task(load_config(ROOT / "experiments/quickstart.toml",
                                [f"tuning.method={method}"]))


def measure(steps: dict[str, Step], n_steps: int, blocks: int) -> dict[str, float]:
    """Median seconds per step over `blocks` alternating blocks of `n_steps` steps."""
    for step in steps.values():  # warm up: first calls allocate and build hooks
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step()
            times[name].append((time.perf_counter() - t0) / n_steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(step: Step, label: str, n_steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    print(f"\n--- profile: {label} ({n_steps} steps), top ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prompt", "lora"])
    parser.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also profile the plain and the default-mode DP step")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = load_config(ROOT / "experiments/quickstart.toml")
    threads = max(1, int(cfg.simulation.num_cpus_per_client))
    configure_torch(num_threads=threads)
    torch.manual_seed(0)
    task = _task("prompt")
    n = cfg.train.batch_size
    batch = task.train.tensors(torch.arange(n).numpy()).tensors
    print(f"batch {n} x {cfg.model.max_length} tokens, torch threads {threads}, "
          f"{args.blocks} blocks of {args.steps} steps, median s/step")
    default = SampleDPConfig().grad_sample_mode
    rows = []
    for method in args.methods:
        steps = {"plain": plain_step(method, batch)}
        for mode in args.modes:
            try:
                steps[mode] = dp_step(method, batch, mode)
                steps[mode]()
            except Exception as exc:  # noqa: BLE001 (a mode Opacus cannot apply here)
                steps.pop(mode, None)
                print(f"{method:>7} {mode:>9}: unsupported ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:100]})")
        timed = measure(steps, args.steps, args.blocks)
        for mode in (m for m in args.modes if m in timed):
            ratio = timed[mode] / timed["plain"]
            rows.append((method, mode, timed["plain"], timed[mode], ratio))
            print(f"{method:>7} {mode:>9}: plain {timed['plain'] * 1e3:7.1f} ms, "
                  f"DP {timed[mode] * 1e3:7.1f} ms, ratio {ratio:.3f}"
                  f"{'  (default)' if mode == default else ''}", flush=True)
        if args.profile:
            profile(steps["plain"], f"{method} plain", args.steps)
            if default in steps:
                profile(steps[default], f"{method} DP {default}", args.steps)
    print("\n| method | grad_sample_mode | plain ms/step | DP ms/step | DP / plain |")
    print("|---|---|---:|---:|---:|")
    for method, mode, plain, dp, ratio in rows:
        print(f"| {method} | {mode}{' (default)' if mode == default else ''} | "
              f"{plain * 1e3:.1f} | {dp * 1e3:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()

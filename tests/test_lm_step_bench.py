"""The LM step benchmark (benchmarks/lm_step.py) on a tiny random Llama, and one model per
worker process in a real run.

- The bare loop and fedtune's client step, on the same batch from the same init at noise 0,
  take the same first step (loss and adapter update), and the check notices a loop that
  clips differently.
- Each loop times its steps and reports its set-up and per-round parts.
- `--alternate` runs the loops in fresh processes in alternating order and prints the ratio
  of the medians.
- `fedtune run` (2 virtual clients, 1 round, one worker process): the process that trains
  both clients loads the backbone once and builds its tuned model once, counted by a
  `sitecustomize` hook that every process of the run (driver, Ray workers) imports."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.lm_fixtures import write_users

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lm_step", ROOT / "benchmarks" / "lm_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_step"] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("lm_step", None)


def _model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _batches(count: int, n: int = 4, t: int = 12):
    """Random ids, row i right-padded by 2i positions (pad id 0, masked)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, 2000, (n, t), generator=g)
        mask = torch.ones_like(ids)
        for i in range(1, n):
            mask[i, t - 2 * i:] = 0
        out.append((ids.masked_fill(mask == 0, 0), mask))
    return out


def _args(**changes):
    base = dict(lr=0.5, noise=1.0, clip=0.01, seed=0, warmup=1, batch_size=4, seq=12,
                steps=2, threads=1)
    return argparse.Namespace(**{**base, **changes})


def test_both_loops_take_the_same_first_step_at_noise_0(bench, lm_folders):
    # clip 0.01: every row's gradient is clipped, so the check covers clipping too.
    report = bench.first_step_check(_model(lm_folders["llama"]), _batches(1)[0], _args())
    fedtune = report["loops"]["fedtune"]
    assert report["update_max"] > 0 and math.isfinite(report["bare_loss"])
    assert fedtune["loss_diff"] <= 1e-5 * report["bare_loss"]
    assert fedtune["update_diff"] <= bench.CHECK_RTOL * report["update_max"]
    assert fedtune["agree"]


def test_the_check_notices_a_loop_that_clips_differently(bench, lm_folders, monkeypatch):
    prepare = bench.PREPARE["fedtune"]
    monkeypatch.setitem(bench.PREPARE, "fedtune", lambda model, batches, args: prepare(
        model, batches, argparse.Namespace(**{**vars(args), "clip": args.clip * 2})))
    report = bench.first_step_check(_model(lm_folders["llama"]), _batches(1)[0], _args())
    fedtune = report["loops"]["fedtune"]
    assert fedtune["loss_diff"] <= 1e-5 * report["bare_loss"]  # same forward
    assert fedtune["update_diff"] > 0.5 * report["update_max"] and not fedtune["agree"]


@pytest.mark.parametrize("loop", ["bare", "fedtune"])
def test_each_loop_times_its_steps_and_reports_its_parts(bench, lm_folders, loop):
    figures = bench.LOOPS[loop](_model(lm_folders["llama"]), _batches(3), _args())
    assert len(figures.step_s) == len(figures.cpu_s) == len(figures.losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in figures.losses)
    assert figures.peak_rss_mb > 0 and all(s > 0 for s in figures.step_s)
    assert "make_private_s" in figures.setup_s
    if loop == "fedtune":
        assert {"freeze_and_hash_s", "build_s"} <= set(figures.setup_s)
        assert {"close_s", "account_s", "flops_s"} <= set(figures.after_s)


def _figures(step_s, cpu_s, rss):
    return {"step_s": step_s, "cpu_s": cpu_s, "peak_rss_mb": rss}


def test_the_comparison_is_the_ratio_of_the_medians_of_each_runs_median(bench):
    runs = {"bare": [_figures([1.0, 2.0, 9.0], [1, 1, 1], 100),
                     _figures([3.0], [2, 2], 300), _figures([2.5], [1.5], 200)],
            "fedtune": [_figures([2.0, 3.0, 3.0], [2, 2], 500),
                        _figures([4.0], [3], 400), _figures([3.5], [2.5], 450)]}
    out = bench.compare_runs(runs)
    assert out["bare"] == {"runs": 3, "step_s": 2.5, "cpu_s": 1.5, "peak_rss_mb": 300}
    assert out["fedtune"]["step_s"] == 3.5 and out["fedtune"]["peak_rss_mb"] == 500
    assert out["ratio"] == pytest.approx(3.5 / 2.5)
    assert out["cpu_ratio"] == pytest.approx(2.5 / 1.5)


def test_alternate_runs_each_loop_in_fresh_processes_in_alternating_order(bench, monkeypatch,
                                                                          capsys, tmp_path):
    calls = []

    def fake_run(cmd, check):
        assert check and cmd[0] == sys.executable and cmd[1].endswith("lm_step.py")
        loop, out = cmd[cmd.index("--loop") + 1], cmd[cmd.index("--json") + 1]
        assert "--steps=4" in cmd and "--noise=1.0" in cmd and "--seed=3" in cmd
        calls.append(loop)
        step = {"bare": 2.0, "fedtune": 2.2}[loop]
        Path(out).write_text(json.dumps(_figures([step], [step], 1000)))

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = _args(alternate=3, steps=4, seed=3, json=str(tmp_path / "summary.json"))
    summary = bench.alternate(args)
    assert calls == ["bare", "fedtune", "fedtune", "bare", "bare", "fedtune"]
    assert summary["ratio"] == pytest.approx(1.1)
    assert capsys.readouterr().out.splitlines()[-1] == "ratio=1.100"
    assert json.loads((tmp_path / "summary.json").read_text())["ratio"] == pytest.approx(1.1)


# --- one model per worker process, in a real run ------------------------------------------

# Imported by every Python process of the run (PYTHONPATH): after each counted module is
# imported, its function is wrapped to append one line (pid, event, peak RSS) to the log.
SITECUSTOMIZE = textwrap.dedent('''
    import functools, importlib.machinery, json, os, sys

    LOG = os.environ["FEDTUNE_TEST_EVENTS"]
    COUNTED = {  # module -> (object path, event)
        "fedtune.models.backbone": ("load_pretrained", "backbone_load"),
        "fedtune.task.task": ("Task.new_model", "model_build"),
        "clients.handlers": ("handle_train", "train"),
        "fedtune.tuning.registry": ("build_tuned_model", "tuned_build"),
    }

    def _peak_kb():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))

    def _counted(fn, event):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                with open(LOG, "a") as fh:
                    fh.write(json.dumps({"pid": os.getpid(), "event": event,
                                         "peak_kb": _peak_kb()}) + "\\n")
        return wrapper

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name not in COUNTED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None:
                return None
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                *owner, attr = COUNTED[name][0].split(".")
                holder = getattr(module, owner[0]) if owner else module
                setattr(holder, attr, _counted(getattr(holder, attr), COUNTED[name][1]))

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
''')


@pytest.mark.slow
def test_a_worker_process_loads_one_model_for_all_its_virtual_clients(lm_folders, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    events = tmp_path / "events.jsonl"
    data = write_users(tmp_path / "mail.jsonl", users=("alice", "bob"))
    config = tmp_path / "lm.toml"
    config.write_text(f"""name = "lm-one-model"
[task]
kind = "causal_lm"
[model]
backbone = "{lm_folders['llama']}"
max_length = 16
[data]
corpus = "hf"
partition = "natural"
by = "user"
num_clients = 2
options = {{ path = "json", data_files = "{data}", test_fraction = 0.25 }}
[tuning]
method = "lora"
[train]
rounds = 1
clients_per_round = 2
local_steps = 1
batch_size = 4
[privacy.sample]
enabled = true
[simulation]
# One worker process (one CPU, one per client): it trains both virtual clients.
num_cpus = 1
num_cpus_per_client = 1
""")
    args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out",
            str(tmp_path / "run")]
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
                               "FEDTUNE_TEST_EVENTS": str(events)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    peak: dict[int, int] = defaultdict(int)
    for line in events.read_text().splitlines():
        event = json.loads(line)
        counts[event["pid"]][event["event"]] += 1
        peak[event["pid"]] = max(peak[event["pid"]], event["peak_kb"])
    workers = {pid: c for pid, c in counts.items() if c["train"]}
    assert sum(c["train"] for c in workers.values()) == 2, dict(counts)
    (pid, worker), = workers.items()  # one worker process trained both clients
    assert worker["train"] == 2
    assert worker["backbone_load"] == 1 and worker["model_build"] == 1, dict(worker)
    # Every tuned model the worker built (a LoRA one is a deep copy of the decoder): the
    # task's spec and the model it trains on, not one per client.
    assert worker["tuned_build"] <= 2, dict(worker)
    # No process of the run (the driver's server included) loads the backbone twice.
    assert all(c["backbone_load"] <= 1 for c in counts.values()), dict(counts)
    print(f"worker {pid}: {dict(worker)}, peak RSS {peak[pid] / 1024:.0f} MB after 2 clients")

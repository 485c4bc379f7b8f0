"""Test-wide settings: offline, quiet, and caches inside a per-session temp dir."""

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import settings

# Generated-input tests (tests/test_fuzz.py and others) draw the same inputs on every run of
# the same test code: a CI run is green or red by the commit, never by chance (a CI run that
# drew a new input found a latent bug on some runs only). New inputs are a deliberate step:
# `pytest --hypothesis-profile=explore tests/test_fuzz.py` (docs/development.md), before a
# change that touches a parser or the wire is called done.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist (the README's `-n 2`) the workers share the cores: torch's intra-op
# threads are split between them, as oversubscribed OpenMP threads spin and wait on each
# other. Set before torch is imported; the end-to-end runs' processes inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_configure(config: pytest.Config) -> None:
    """The "deterministic" profile unless `--hypothesis-profile` names one. Here, not at
    import: a module body runs again wherever this module is imported a second time, after
    Hypothesis loaded the profile asked for (review ATTACK35)."""
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile("deterministic")


@pytest.hookimpl(trylast=True)  # after `-m` deselected: the slow tests that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the files with the most end-to-end runs (marked slow) first: the
    README's command hands out whole files in collection order (`--dist loadfile
    --no-loadscope-reorder`: a file's module fixtures, such as a shared run, run once), so
    the longest files start first and the unit tests fill in around them, instead of one
    end-to-end file starting last while the other worker has nothing left. Every worker
    sorts the same collection the same way, as xdist requires."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow: dict[object, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: file order kept among equals


@pytest.fixture(scope="session", autouse=True)
def _fedtune_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fedtune's cache (tokens, tasks, the untrained model's figures, frozen-prefix states)
    in this test run's temp folder. Under pytest-xdist (`-n 2`) every worker uses the same
    one, in the folder above the workers' own: a task tokenized or scored by one is read by
    the other. Every entry is written aside and renamed into place (concurrent Ray workers
    rely on that already), so two workers never see half an entry."""
    if "FEDTUNE_TEST_KEEP_CACHE" in os.environ:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "fedtune-cache"
        shared.mkdir(exist_ok=True)
        os.environ["FEDTUNE_CACHE_DIR"] = str(shared)
    else:
        os.environ["FEDTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtune-cache"))


@pytest.fixture
def dp_step():
    """One Opacus DP-SGD step on random tokens: `dp_step(model, grad_sample_mode="hooks")`."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedtune.config import SampleDPConfig
    from fedtune.privacy import make_private

    def step(model, grad_sample_mode: str = "hooks", lr: float = 0.5) -> None:
        ids = torch.randint(1000, 2000, (16, 8))
        data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (16,)))
        params = [p for p in model.parameters() if p.requires_grad]
        private = make_private(model, torch.optim.SGD(params, lr=lr),
                               DataLoader(data, batch_size=8),
                               SampleDPConfig(grad_sample_mode=grad_sample_mode), 1.0,
                               reproducible_seed=0)
        try:
            for x, m, y in private.loader:
                if y.numel():
                    private.optimizer.zero_grad()
                    private.criterion(private.model(x, m), y).backward()
                    private.optimizer.step()
                    return
            raise AssertionError("every Poisson batch was empty")
        finally:
            private.close()

    return step


@pytest.fixture
def task_identity():
    """Messages built outside a running Flower app need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """The part of a Flower Grid that sampling reads: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture(autouse=True)
def _no_flush_denormal_leak():
    """`configure_torch` flushes denormals process-wide (CPU flags, Python floats too);
    tests that load models turn it on, and it must not leak into the next test."""
    yield
    import torch

    torch.set_flush_denormal(False)


class CliResult(NamedTuple):
    code: int
    stdout: str
    output: str  # stdout and stderr


@pytest.fixture
def cli(monkeypatch):
    """`cli(*args)` runs `fedtune *args` through the typer app in this process, from the
    repository root: for errors that come before anything starts, without the seconds of
    imports a new process pays. An uncaught exception (a traceback, in a real process)
    fails the call: the app must return or end with SystemExit. What `fedtune run` sets up for a
    simulation before such an error (environment variables, Flower's and Ray's log
    levels, the fast message hand-out) is undone afterwards."""
    from pathlib import Path

    from typer.testing import CliRunner

    from fedtune.cli import app
    from fedtune.compat.flower_sim import fast_dispatch_installed, uninstall_fast_dispatch

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    environ, dispatch = dict(os.environ), fast_dispatch_installed()
    levels = {name: logging.getLogger(name).level for name in ("flwr", "ray")}

    def invoke(*args: str) -> CliResult:
        result = CliRunner().invoke(app, list(args))
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            (result.exception, result.output)
        return CliResult(result.exit_code, result.stdout, result.output)

    yield invoke
    os.environ.clear()
    os.environ.update(environ)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if not dispatch:
        uninstall_fast_dispatch()


def tiny_gpt2(n_layer: int):
    """A randomly initialised `n_layer`-layer GPT-2 (no download) with a stand-in
    tokenizer: the prompt model only reads its special-token ids."""
    from types import SimpleNamespace

    import torch
    from transformers import GPT2Config, GPT2Model

    from fedtune.models import Backbone

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=3000, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2Model(config).eval().requires_grad_(False)
    tok = SimpleNamespace(cls_token_id=None, sep_token_id=None, eos_token_id=0)
    return Backbone(name="tiny-gpt2", model=model, tokenizer=tok, hash="tiny-gpt2")


@pytest.fixture(scope="module")
def tiny_backbone():
    """A 2-layer `tiny_gpt2`."""
    return tiny_gpt2(2)


class SharedRun(NamedTuple):
    out: Path  # the run folder: read it, or copy it (shutil.copytree) before writing
    stdout: str  # what `fedtune run` printed


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SharedRun]:
    """`shared_run(config, overrides)`: one successful `fedtune run` of that config per test
    session, whichever test (and, under pytest-xdist, whichever worker) asks first; the others
    wait for it and read the same folder. A tiny simulation costs about a minute, and tests
    in several files check different things of the same run. Only for tests that READ the
    folder: one that writes copies it first."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder above the workers' own, as for fedtune's cache
    root = base / "shared-runs"
    root.mkdir(exist_ok=True)
    repo = Path(__file__).resolve().parents[1]

    def run(config: Path, overrides: list[str] | tuple[str, ...]) -> SharedRun:
        key = hashlib.sha256(repr((str(config), list(overrides))).encode()).hexdigest()[:16]
        out, printed, done = root / key, root / f"{key}.stdout", root / f"{key}.done"
        with (root / f"{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # a failed attempt's leftovers
                args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out",
                        str(out)]
                for item in overrides:
                    args += ["--set", item]
                proc = subprocess.run(args, cwd=repo, capture_output=True, text=True,
                                      timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
                printed.write_text(proc.stdout)
                done.touch()
        return SharedRun(out, printed.read_text())

    return run


@pytest.fixture(scope="session")
def lm_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each decoder family as a user hands it over: a 2-block CausalLM folder (random
    weights, the packaged MiniLM tokenizer), family -> folder (`tests/lm_fixtures.py`).
    Shared by every test of the session: read it, never write into it."""
    from tests.lm_fixtures import write_decoder_folders

    return write_decoder_folders(tmp_path_factory.mktemp("decoders"))

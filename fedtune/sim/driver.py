"""Run an experiment through Flower's simulation engine (Ray backend).

Wires the ServerApp (`strategies/`) and ClientApp (`clients/`) built for one config, and
keeps Flower, Ray and Hugging Face quiet, offline and inside temp dirs.

Nothing here imports torch, transformers or Flower at load time or before `start_ray`:
`fedtune run` imports this module before Ray can start, and the driver's heavy imports run
in a thread while Ray starts (`_driver_task`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, ExperimentConfig
from fedtune.run.folder import SUMMARY_FILE
from fedtune.runtime.interrupt import end_children, on_stop
from fedtune.runtime.quiet import routed
from fedtune.runtime.startup import phase

# Set before Flower/Ray import: actors inherit the driver's environment at ray.init.
_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_environment() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    sim = cfg.simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                 "logging_level": logging.ERROR}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        init_args["num_cpus"] = sim.num_cpus or os.cpu_count() or 1
        init_args["num_gpus"] = 0 if sim.num_gpus_per_client == 0 else None
        init_args = {k: v for k, v in init_args.items() if v is not None}
    return {
        "client_resources": {"num_cpus": sim.num_cpus_per_client,
                             "num_gpus": sim.num_gpus_per_client},
        "init_args": init_args,
    }


def check_user_budget(cfg: ExperimentConfig) -> None:
    """A given user-level noise multiplier too small for even one round within the budget
    is a config error, reported before any actor starts."""
    user = cfg.privacy.user
    if not (user.enabled and user.noise_multiplier > 0):
        return
    from fedtune.privacy.user_level import UserLevelAccount
    from fedtune.run.epsilon_marks import epsilon_marks, reason_epsilon

    account = UserLevelAccount(user.noise_multiplier, cfg.train.clients_per_round,
                               cfg.data.num_clients, user.delta)
    first = account.epsilon(1)
    if first is not None and first > user.target_epsilon:
        raise ConfigError(
            f"privacy.user.noise_multiplier={user.noise_multiplier} spends epsilon "
            f"{reason_epsilon(first, epsilon_marks(cfg, 'user', first))} in the first round "
            f"alone, over privacy.user.target_epsilon="
            f"{user.target_epsilon}; raise the noise or set it to 0 to calibrate")


def check_split(cfg: ExperimentConfig, model: Any) -> None:
    """A cut the backbone cannot take is reported before any actor starts, not as a
    failure of every client."""
    if cfg.split.enabled:
        from fedtune.split.cut import SplitBackbone

        SplitBackbone(model, cfg.split.cut_layer, cfg.split.tail_layers)


def start_ray(cfg: ExperimentConfig) -> None:
    """Start Ray the way Flower's Ray backend would (`backend_config`'s init_args, the
    driver's sys.path for the actors), so that Flower finds it running and fedtune owns
    what started: a local Ray is checked to be on loopback, and Ctrl-C / SIGTERM keep
    fedtune's handlers (`ray.init` replaces the SIGTERM one)."""
    import ray

    from fedtune.runtime.interrupt import rearm

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    # The workers import the ClientApp's modules as they start (fedtune.sim.warmup), while
    # the driver still builds its task, instead of on their first message.
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath},
                          "worker_process_setup_hook": "fedtune.sim.warmup.import_client"},
             **backend_config(cfg)["init_args"])
    rearm()
    if not cfg.simulation.ray_address:
        from fedtune.runtime.local_ray import check_started

        check_started()


def _quiet_engine() -> None:
    """On Ctrl-C/SIGTERM: the engine's threads would report every actor that the stop ends
    as an error with a traceback (Flower shuts Ray down on its way out, while they still
    wait); the user asked for exactly that, so they stay quiet."""
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _ray_scope(cfg: ExperimentConfig, ray_temp: Path) -> AbstractContextManager[None]:
    """A local Ray stays on loopback with its files under `ray_temp`; a cluster is used
    as it is."""
    if cfg.simulation.ray_address:
        return nullcontext()
    from fedtune.runtime.local_ray import loopback_ray

    ray_temp.mkdir(parents=True, exist_ok=True)
    return loopback_ray(ray_temp)


def prepare_resume(out_dir: Path, spec_hash: str) -> int:
    """Check that `out_dir` can be resumed and complete its ledger up to the checkpoint;
    returns the last completed round. Errors name what is wrong before any actor starts."""
    from fedtune.run.checkpoint import CheckpointError, load_checkpoint
    from fedtune.run.ledger import Ledger

    if (out_dir / SUMMARY_FILE).exists():
        raise CheckpointError(f"{out_dir} already finished (summary.json exists); "
                              "nothing to resume")
    state = load_checkpoint(out_dir, spec_hash)
    Ledger(out_dir).restore(state.round, state.record)
    return state.round


def _checkpoint_state(cfg: ExperimentConfig, out_dir: Path) -> Any:
    """The checkpoint (`fedtune.run.checkpoint.ServerState`) of the run to resume in
    `out_dir`, once `prepare_resume` accepted the folder; read with the task's spec hash
    (`fedtune run --resume` has built that task already, in this process)."""
    from fedtune.run.checkpoint import load_checkpoint
    from fedtune.task.task import get_task

    spec_hash = get_task(cfg).spec.hash
    prepare_resume(out_dir, spec_hash)
    return load_checkpoint(out_dir, spec_hash)


def finish_without_workers(cfg: ExperimentConfig, out_dir: Path, on_round=None
                           ) -> dict[str, Any] | None:
    """Resuming a run whose rounds are all done (its checkpoint is at the last round, or a
    privacy budget stopped it) needs no client: the server's own steps after the rounds
    (the final model's state, its test score, the summary) run here, in this process,
    without starting Ray or the workers (about 50 s on a 2-core machine, only to be
    stopped again). Returns the summary, or None when rounds are left to run."""
    state = _checkpoint_state(cfg, out_dir)
    if state.round < cfg.train.rounds and state.stopped is None:
        return None
    from strategies.server import run_server

    # With no round left, run_server neither discovers workers nor sends a message: it
    # restores the ledger, saves the final state, scores it once and writes the summary.
    return run_server(None, cfg, out_dir, on_round, resume=True)


class _Background:
    """Run `fn` in a thread; `result()` waits and returns its value or raises its error
    (in the calling thread, so it reaches the CLI's one-line error handling)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                        name="fedtune-task-build")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller by result())
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def failed(self) -> bool:
        """True once `fn` has raised (never waits)."""
        return not self._thread.is_alive() and self._error is not None

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _driver_task(cfg: ExperimentConfig, flower: threading.Event,
                 imported: threading.Event) -> Any:
    """The driver's imports and its task. Flower's modules and the light app entries come
    first (`flower` is set then): the main thread builds the apps and starts the simulation
    with them as soon as Ray is up, so the actors start while this thread still imports
    torch, transformers and the apps' code (`imported` is set then; the ServerApp waits
    for it, so that no module is imported by two threads at once)."""
    try:
        with phase("imports", "torch, transformers, Flower, the apps"):
            try:
                import clients.app  # noqa: F401
                import fedtune.compat.flower_sim  # noqa: F401
                import strategies.grid_io  # noqa: F401
                import strategies.server_app  # noqa: F401
            finally:
                flower.set()
            # transformers' model code, which fedtune.models imports only to load a model:
            # most of the import time, reported here rather than as the model's loading.
            from transformers import PreTrainedModel  # noqa: F401

            import clients.handlers  # noqa: F401
            import strategies.server  # noqa: F401
            from fedtune.task.task import get_task
    finally:
        imported.set()
    return get_task(cfg)


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, on_round=None,
                   verbose: bool = False, resume: bool = False) -> dict[str, Any]:
    """Simulate `cfg` with `data.num_clients` virtual clients; returns `summary.json`.
    With `resume`, continue the interrupted run in `out_dir` from its checkpoint."""
    quiet_environment()
    if not cfg.simulation.ray_address:
        from fedtune.runtime.local_ray import prefer_loopback

        prefer_loopback()  # before anything imports Ray (Flower's simulation does)
    if not verbose:
        # Actors read it when they import Flower: their shutdown notices stay quiet too.
        os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    from fedtune.models.pruning_setup import resolve_config

    # A layer-pruning rule becomes its layer list once, here: the run's config.toml, its
    # workers and whatever is rebuilt from the folder later all prune the same layers.
    cfg = resolve_config(cfg)
    check_user_budget(cfg)
    out_dir = Path(out_dir)
    if resume and (summary := finish_without_workers(cfg, out_dir, on_round)) is not None:
        return summary
    # The driver's imports and task (backbone, corpus, tokens, partitions) are built in a
    # thread while this one starts Ray and then the simulation: `ray.init` mostly waits for
    # the processes it launches, and the workers import torch and the client code as they
    # start (fedtune.sim.warmup); on a small machine all of it shares the cores. The
    # ServerApp waits for the task before its first message (`prepare` below), so a bad
    # backbone, corpus, cut or resume still fails with its own message (after Ray and the
    # workers started, which are stopped again: the price of the overlap).
    flower, imported = threading.Event(), threading.Event()
    building = _Background(lambda: _driver_task(cfg, flower, imported))
    if not verbose and not routed():
        # Flower logs its own sampling notices at WARNING on every run (`fedtune run` routes
        # them to the run's log file instead: fedtune.runtime.quiet).
        logging.getLogger("flwr").setLevel(logging.ERROR)
    import ray

    # One temp folder for the run, removed on the way out (also after Ctrl-C or SIGTERM:
    # fedtune.runtime.interrupt): the task bundle the actors read (memory-mapped arrays, instead of
    # each loading, hashing and partitioning the corpus again) and, for a local Ray, Ray's
    # session folder.
    temp_dir = tempfile.TemporaryDirectory(prefix="fedtune-", ignore_cleanup_errors=True)
    summaries: list[dict[str, Any]] = []  # what run_server returns, as it wrote it
    try:
        # Ray adds ray/session_<date>_<pid>/sockets/...: kept short, as Unix socket paths
        # are limited to 107 bytes.
        with _ray_scope(cfg, Path(temp_dir.name)), on_stop(temp_dir.cleanup), \
                on_stop(end_children), on_stop(_quiet_engine):
            try:
                with phase("ray", "local, loopback" if not cfg.simulation.ray_address
                           else f"cluster at {cfg.simulation.ray_address}"):
                    start_ray(cfg)
            except BaseException:
                building.wait()
                raise
            flower.wait()  # a failed import fails again below, in this thread
            from clients.app import build_client_app
            from fedtune.compat.flower_sim import install_fast_dispatch, run_inprocess
            from strategies.preparation import Preparation
            from strategies.server_app import build_server_app

            install_fast_dispatch()
            bundle = Path(temp_dir.name) / "bundle"

            def finish() -> None:
                # In the ServerApp's thread once the workers answered discovery (their
                # first training message waits for this): a bad backbone, corpus, cut or
                # resume still ends the run with its own error before the run folder is
                # touched.
                from fedtune.task.task import write_bundle

                task = building.result()
                check_split(cfg, task.backbone.model)
                if resume:
                    prepare_resume(out_dir, task.spec.hash)
                write_bundle(task, bundle)

            def imports_done() -> None:
                # In the ServerApp's thread before it imports the server code: an import
                # that failed in the other thread ends the run with its own error.
                imported.wait()
                if building.failed():
                    building.result()

            run_inprocess(
                server_app=build_server_app(cfg, out_dir, on_round, resume=resume,
                                            prepare=Preparation(finish, building.failed,
                                                                imports_done,
                                                                summaries.append)),
                client_app=build_client_app(cfg, str(bundle)),
                num_supernodes=cfg.data.num_clients,
                backend_config=backend_config(cfg),
                verbose=verbose,
            )
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            temp_dir.cleanup()
    if not summaries or not summaries[-1]:  # the ServerApp failed or was stopped
        raise RuntimeError(f"the simulation ended without writing {out_dir / SUMMARY_FILE}; "
                           "see the log above for the ServerApp's error")
    return summaries[-1]

"""A long-lived ClientApp process for a SuperNode started with `--isolation process`.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` process for
every message: each round it pays Python start-up, the torch/transformers imports and the
backbone load again (~5-40 s here). This worker asks the SuperNode's Runtime API for tasks
in a loop and runs them in one process, so the backbone, tokenized data and Opacus state
stay loaded between rounds (the same "once per process" the simulation gets from Ray
actors).

Flower has no public long-running ClientApp mode (1.41, 1.42): the Runtime API calls live in
`fedtune.compat.flower_deploy`, which refuses an untested Flower version (then start the
SuperNode without `--isolation process`: Flower's own `flwr-clientapp` per message).

It runs the ClientApp installed on this node (`clients.app:app` by default), not code from
the run's FAB: the node's operator decides which code touches the node's data. Runs of
another app, or of another fedtune version, are refused with an error reply.

    python -m fedtune.deploy.worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.clientapp import ClientApp
from flwr.common import log

from fedtune.compat.flower_deploy import RuntimeApi, enabled, error_reply
from fedtune.config.flower_run import config_from_run_config
from fedtune.deploy.address import DeployError, check_address, check_file
from fedtune.privacy.seeded_noise import refuse_seeded_noise

DEFAULT_APP = "clients.app:app"
# The SuperNode drops a task whose process has been silent for 2 x 30 s; local training
# can take longer than that, so a thread keeps the task alive.
HEARTBEAT_S = 20.0


@dataclass(frozen=True)
class WorkerConfig:
    runtime_api_address: str
    root_certificates: str | None = None  # CA of the Runtime API's TLS cert; None: plain HTTP
    app_ref: str = DEFAULT_APP
    app_dir: Path | None = None  # a Flower app project to load `app_ref` from
    poll_s: float = 0.05


def app_identity(app_dir: Path | None) -> tuple[str, str]:
    """The (FAB id, version) a run must have to be served: the app project's, or the
    installed fedtune's."""
    if app_dir is None:
        return "fedtune/fedtune", importlib.metadata.version("fedtune")
    path = app_dir / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text())
        # How Flower names a FAB: "<publisher>/<project name>", at the project's version.
        return (f"{project['tool']['flwr']['app']['publisher']}/{project['project']['name']}",
                str(project["project"]["version"]))
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a Flower app project (needs [project] name and "
                         f"version and [tool.flwr.app] publisher): {exc!r}") from None


def load_app(ref: str, app_dir: Path | None) -> object:
    """`module:attribute` (attribute may be dotted), imported from `app_dir` first."""
    module_name, sep, attr = ref.partition(":")
    if not (module_name and sep and attr):
        raise ValueError(f"app reference {ref!r} is not MODULE:ATTRIBUTE")
    if app_dir is not None and str(app_dir.resolve()) not in sys.path:
        sys.path.insert(0, str(app_dir.resolve()))
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        if not config.poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {config.poll_s}")
        self.config = config
        self.identity = app_identity(config.app_dir)
        # Loaded once: importing it pulls in torch and the data/model caches.
        app = load_app(config.app_ref, config.app_dir)
        if not isinstance(app, ClientApp):
            raise ValueError(f"{config.app_ref} is a {type(app).__name__}, not a ClientApp")
        self.app: ClientApp = app
        self.runtime = RuntimeApi(config.runtime_api_address, config.root_certificates)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                busy = self.run_once()
            except httpx.TransportError as exc:
                # The SuperNode restarts or is not up yet: keep asking, a bit slower.
                log(logging.WARNING, "SuperNode Runtime API unreachable: %s", exc)
                stop.wait(1.0)
                continue
            if not busy:
                stop.wait(self.config.poll_s)

    def run_once(self) -> bool:
        """Run one pending task if there is one; returns whether there was."""
        task = self.runtime.acquire()
        if task is None:
            return False
        beat = _Heartbeat(task.heartbeat)
        context, completed, details = None, False, "task failed before it ran"
        try:
            beat.start()
            message, context, fab_id, fab_version = task.pull()
            try:
                self._check_run(fab_id, fab_version)
                if self.config.app_ref == DEFAULT_APP:  # fedtune's ClientApp: its config
                    refuse_seeded_noise(config_from_run_config(context.run_config))
                reply = self.app(message=message, context=context)
                completed, details = True, ""
            except Exception as exc:  # noqa: BLE001 - the reply carries it to the server
                log(logging.ERROR, "ClientApp raised an exception", exc_info=exc)
                details = f"{type(exc)}:<'{exc}'>"
                reply = error_reply(message, details)
            task.reply(reply, context)
        finally:
            beat.stop()
            task.finish(context, completed, details)
            task.close()
        return True

    def _check_run(self, fab_id: str, fab_version: str) -> None:
        if (fab_id, fab_version) != self.identity:
            raise RuntimeError(
                f"this node serves {' '.join(self.identity)} ({self.config.app_ref}); the "
                f"run is {fab_id} {fab_version}: install the same app version on the node "
                "and restart its worker")

    def close(self) -> None:
        self.runtime.close()


class _Heartbeat:
    def __init__(self, send: Callable[[], None]) -> None:
        self.send = send
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.send()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next time
                log(logging.WARNING, "task heartbeat failed: %s", exc)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Long-lived ClientApp worker for `flower-supernode --isolation process`")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, HOST:PORT (its --host/--port)")
    parser.add_argument("--root-certificates", default=None,
                        help="CA certificate of the Runtime API (when the SuperNode was "
                             "started with --ssl-certfile); omitted: plain HTTP on loopback")
    parser.add_argument("--app", default=DEFAULT_APP, help="ClientApp reference")
    parser.add_argument("--app-dir", type=Path, default=None,
                        help="Flower app project holding --app (default: the installed "
                             "fedtune, serving runs of fedtune/fedtune at its version)")
    parser.add_argument("--poll-interval", type=float, default=WorkerConfig.poll_s,
                        help="seconds between asking the SuperNode for a task")
    args = parser.parse_args(argv)
    try:
        check_address(args.runtime_api_address, "--runtime-api-address")
        if args.root_certificates is not None:
            check_file(args.root_certificates, "--root-certificates")
        if args.app_dir is not None:
            check_file(args.app_dir / "pyproject.toml", "--app-dir")
    except DeployError as exc:
        parser.error(str(exc))
    if not enabled("long-lived-worker"):
        parser.exit(2, "fedtune.deploy.worker: this Flower version is untested with the "
                       "worker; start the SuperNode without --isolation process (`fedtune "
                       "deploy supernode --no-worker`)\n")
    worker = Worker(WorkerConfig(args.runtime_api_address, args.root_certificates,
                                 args.app, args.app_dir, poll_s=args.poll_interval))
    log(logging.INFO, "fedtune worker: serving %s for the SuperNode at %s",
        args.app, args.runtime_api_address)
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


if __name__ == "__main__":
    main()

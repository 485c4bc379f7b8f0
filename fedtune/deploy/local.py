"""A whole deployment on this machine: SuperLink (TLS, SuperNode authentication) on
loopback, its Fleet gateway (`fleet_gateway`, here on loopback too), N registered
SuperNodes connecting through the gateway, each with its own `partition-id` (or data file),
and `flwr run`.

Tests and `benchmarks/deploy_latency.py` use it; docs/deployment.md shows the same commands to
type by hand on separate machines. Every process is started here, remembered by PID and
stopped by PID in `stop()` (also when a start fails halfway).

Two modes:

- `fast=True` (default): SuperNodes via `fedtune.deploy.supernode` (0.1 s polling) with
  `--isolation process` and one long-lived `fedtune.deploy.worker` each (on a Flower version
  `fedtune.compat.flower_deploy` was not tested on: Flower's public behaviour, logged);
- `fast=False`: Flower's defaults (`flower-supernode`, a new `flwr-clientapp` process per
  message, 3 s polling on both sides), for comparison.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedtune.compat.flower_deploy import enabled
from fedtune.deploy.certs import CertFiles, load_ca, node_cert_paths, write_certs, write_node_key
from fedtune.deploy.fleet_gateway import Limits
from fedtune.runtime.local_ray import SINGLE_MACHINE_ENV

CONNECTION = "fedtune-local"


# Flower 1.41 also starts its older gRPC Control and Fleet servers, on 0.0.0.0:9093 and
# 0.0.0.0:9092, when these are "1"; they stay off whatever the caller's environment says.
SUPERLINK_ENV = {"FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}


# `flwr run` on a simulation SuperLink (docs/running.md: Running with `flwr run`): Flower's
# `flwr-simulation`, started under the SuperLink, calls `ray.init()`, and a plain one gave
# Ray's GCS, raylet, workers and the driver the host's address on every interface (8
# non-loopback sockets measured). Ray's single-machine switch (fedtune.runtime.local_ray) reaches it
# through the environment the SuperLink passes down to its SuperExec and flwr-simulation.
SIMULATION_ENV = {SINGLE_MACHINE_ENV: "0", **SUPERLINK_ENV}


def simulation_superlink_command(port: int) -> list[str]:
    """`flower-superlink --simulation` on 127.0.0.1 (Control and ServerAppIo APIs there, no
    TLS: nothing off this machine reaches loopback), without runtime dependency
    installation; start it with `SIMULATION_ENV`."""
    return [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--insecure", "--simulation", "--disable-runtime-dependency-installation"]


def superlink_command(port: int, certs: CertFiles) -> list[str]:
    """`flower-superlink` on loopback only: with TLS and SuperNode authentication, without
    runtime dependency installation. Its one port serves every API, the Control API
    included; SuperNodes reach the Fleet API through `fedtune.deploy.fleet_gateway`."""
    return [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"]


def gateway_command(listen: str, superlink: str, certs: CertFiles,
                    limits: Limits | None = None) -> list[str]:
    limits = limits or Limits()
    return [sys.executable, "-m", "fedtune.deploy.fleet_gateway", "--listen", listen,
            "--superlink", superlink, "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--ssl-ca-certfile", str(certs.ca_cert),
            "--max-body-bytes", str(limits.max_body_bytes),
            "--max-connections-per-peer", str(limits.max_connections_per_peer),
            "--max-requests-per-s", repr(limits.max_requests_per_s),
            "--burst", str(limits.burst)]


def flower_bin(name: str) -> str:
    """A Flower console script from the running interpreter's environment (a venv's
    bin/ need not be on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; install "
                                "fedtune (it depends on flwr) into this environment")
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before "
                               f"listening on port {port}:\n{proc.output()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    _fh: IO[bytes]

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")


@dataclass
class LocalDeployment:
    root: Path
    nodes: int = 2
    node_configs: Sequence[str] | None = None  # default: "partition-id=<i>"
    fast: bool = True
    worker: bool = True  # with `fast`: a long-lived worker (False: flwr-clientapp per message)
    worker_args: Sequence[str] = ()            # e.g. an --app for another ClientApp
    env: Mapping[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    port: int = 0        # the SuperLink (Control, ServerAppIo and Fleet API), loopback
    fleet_port: int = 0  # the Fleet gateway, what SuperNodes connect to
    certs: CertFiles | None = None

    # -- environment ------------------------------------------------------------------
    def environ(self) -> dict[str, str]:
        env = {**os.environ, "FLWR_HOME": str(self.root / "flwr-home"),
               "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               **SUPERLINK_ENV,
               # SuperLink and SuperNode start `flower-superexec` & co. by name.
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")])}
        if self.fast:
            # How often the SuperLink's SuperExec looks for a new ServerApp to start.
            env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        else:
            env["FEDTUNE_GRID_POLL_S"] = "3"  # what Flower's HttpGrid waits between pulls
        env.update(self.env)
        return env

    def _spawn(self, name: str, args: Sequence[str],
               env: Mapping[str, str] | None = None) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("wb")
        # Own process group: stop() can end a process and the children it started
        # (SuperExec, flwr-serverapp, flwr-clientapp) without touching anything else.
        popen = subprocess.Popen(list(args), stdout=fh, stderr=subprocess.STDOUT,
                                 env={**self.environ(), **(env or {})}, cwd=self.root,
                                 start_new_session=True)
        proc = Proc(name, popen, log, fh)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([flower_bin("flwr"), *args], capture_output=True, text=True,
                              env=self.environ(), cwd=self.root, timeout=timeout)

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 120) -> LocalDeployment:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = write_certs(self.root / "certs", nodes=self.nodes, force=True)
        self.port = free_port()
        link = self._spawn("superlink", superlink_command(self.port, self.certs))
        wait_for_port(self.port, link, timeout)
        self.fleet_port = free_port()
        # Every node connects from 127.0.0.1 here: one peer address for all of them.
        gateway = self._spawn("fleet-gateway", gateway_command(
            f"127.0.0.1:{self.fleet_port}", f"127.0.0.1:{self.port}", self.certs,
            Limits().scaled(max(1, self.nodes + 1))))
        wait_for_port(self.fleet_port, gateway, timeout)
        self.write_connection()
        node_ids = [self.register(key) for key in self.certs.node_keys]
        assigned = {}
        for i in range(self.nodes):
            config = (self.node_configs[i] if self.node_configs is not None
                      else f"partition-id={i}")
            self.start_supernode(i, self.certs.node_keys[i], config)
            found = re.search(r"partition-id=(\d+)", config)
            if found is not None:
                assigned[str(node_ids[i])] = int(found.group(1))
        # The operator roster the ServerApp binds partitions by (strategies.discovery).
        self.roster_file.write_text(json.dumps(assigned))

    def write_connection(self) -> Path:
        """The `flwr` CLI's connection to this SuperLink, in $FLWR_HOME/config.toml."""
        assert self.certs is not None
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        path = home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n')
        return path

    @property
    def roster_file(self) -> Path:
        return self.root / "roster.json"

    def register(self, private_key: Path) -> int:
        """Register a node's public key; returns the node id the SuperLink gave it."""
        pub = private_key.with_name(private_key.name + ".pub")
        res = self.flwr("supernode", "register", str(pub), CONNECTION, "--format", "json")
        try:
            return int(json.loads(res.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr supernode register {pub} failed:\n"
                               f"{res.stdout[-2000:]}{res.stderr[-2000:]}") from None

    def start_supernode(self, index: int | str, private_key: Path, node_config: str,
                        max_retries: int | None = None) -> Proc:
        assert self.certs is not None
        runtime_port = free_port()
        common = ["--superlink", f"127.0.0.1:{self.fleet_port}",
                  "--root-certificates", str(self.certs.ca_cert),
                  "--auth-supernode-private-key", str(private_key),
                  "--node-config", node_config, "--host", "127.0.0.1",
                  "--port", str(runtime_port)]
        if max_retries is not None:
            common += ["--max-retries", str(max_retries)]
        # The gateway requires the node's TLS client certificate: Flower's SuperNode gets
        # it through fedtune.deploy.supernode (there is no flower-supernode option).
        cert, pem_key = node_cert_paths(private_key)
        common += ["--tls-client-cert", str(cert), "--tls-client-key", str(pem_key)]
        if not self.fast:
            # Flower's own 3 s / 0.5 s sleeps: a cap of 3 s leaves both as they are.
            return self._spawn(f"supernode-{index}", [
                sys.executable, "-m", "fedtune.deploy.supernode", *common],
                env={"FEDTUNE_SUPERNODE_POLL_S": "3"})
        if not (self.worker and enabled("long-lived-worker")):
            return self._spawn(f"supernode-{index}", [
                sys.executable, "-m", "fedtune.deploy.supernode", *common])
        node = self._spawn(f"supernode-{index}", [
            sys.executable, "-m", "fedtune.deploy.supernode", *common,
            "--isolation", "process"])
        self._spawn(f"worker-{index}", [
            sys.executable, "-m", "fedtune.deploy.worker",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", *self.worker_args])
        return node

    def unregistered_supernode(self, max_retries: int = 0) -> Proc:
        """A SuperNode with a fresh key that was never registered (it must be refused)."""
        key = write_node_key(self.root / "certs" / "node-unregistered", force=True,
                             ca=load_ca(self.root / "certs"))
        return self.start_supernode("unregistered", key, "partition-id=0",
                                    max_retries=max_retries)

    def run(self, project: Path, run_config: Mapping[str, object], timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
        """`flwr run PROJECT` on this SuperLink, streaming until the run ends. A project
        whose run config has a `roster` key (fedtune's) gets this deployment's roster."""
        if "roster" in _run_config_keys(project) and "roster" not in run_config:
            run_config = {**run_config, "roster": self.roster_file}
        items = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        return self.flwr("run", str(project), CONNECTION, "--stream",
                         "--run-config", items, timeout=timeout)

    def stop(self, grace: float = 10) -> None:
        """End every process this deployment started, by PID (its process group)."""
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Children (SuperExec, ServerApp) may outlive their parent: end the group.
            _signal_group(proc.popen, signal.SIGKILL)
            if proc.popen.poll() is None:
                proc.popen.wait(timeout=10)
            proc._fh.close()
        self.procs.clear()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.output()[-tail:]}"
                         for p in self.procs)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    # start_new_session=True made the child a group leader: its PGID is its PID.
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _run_config_keys(project: Path) -> set[str]:
    """The run config keys a Flower project declares (`[tool.flwr.app.config]`)."""
    try:
        data = tomllib.loads((Path(project) / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return set()
    return set(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text:
        raise ValueError(f"run config value {text!r}: a single quote cannot be passed")
    return f"'{text}'"  # a TOML literal string: backslashes and spaces stay as they are

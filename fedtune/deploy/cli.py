"""`fedtune deploy ...`: certificates, a SuperNode with its worker, and a whole loopback
deployment in one command. The SuperLink and `flwr run` are Flower's own commands
(docs/deployment.md)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedtune.config.runtime import ENVIRONMENT, RuntimeConfig, runtime_settings
from fedtune.run.folder import SUMMARY_FILE
from fedtune.runtime.interrupt import RunInterrupted, stop_on_signals

deploy_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="Run the same apps on a SuperLink and real SuperNodes.")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@deploy_app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="Where to write the files.")],
    host: Annotated[list[str] | None, typer.Option(
        help="Name or IP the SuperNodes use to reach the SuperLink (repeatable; "
             "localhost/127.0.0.1/::1 are always included).")] = None,
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make.")] = 2,
    days: Annotated[int, typer.Option(help="Certificate lifetime in days.")] = 365,
    force: Annotated[bool, typer.Option(
        help="Replace existing certificate and key files (nodes holding the old CA or "
             "keys stop working).")] = False,
) -> None:
    """CA, SuperLink TLS certificate and SuperNode authentication keys."""
    from fedtune.deploy.certs import CertsError, write_certs

    try:
        files = write_certs(folder, host or [], nodes, days, force=force)
    except CertsError as exc:
        _fail(str(exc))
    console.print(f"[bold green]wrote[/] {files.ca_cert} (give to every SuperNode), "
                  f"{files.server_cert} + {files.server_key} (SuperLink only), "
                  f"{len(files.node_keys)} key pairs node-<i> / node-<i>.pub with TLS client "
                  f"certificates node-<i>.crt / node-<i>.key in {folder}")


@deploy_app.command()
def superlink(
    certs: Annotated[Path, typer.Option(
        help="Folder from `fedtune deploy certs` (ca.crt, server.pem, server.key).")],
    fleet_address: Annotated[str, typer.Option(
        help="Where SuperNodes connect (HOST:PORT): the only port that may face the network, "
             "e.g. 0.0.0.0:9092. Default: loopback only.")] = "127.0.0.1:9092",
    port: Annotated[int, typer.Option(
        help="The SuperLink's own port on 127.0.0.1 (Control and ServerAppIo API: "
             "`flwr` commands on this machine use it).")] = 9093,
    max_body_mb: Annotated[float, typer.Option(
        help="Largest Fleet request body the gateway accepts (MiB; a SuperNode's largest "
             "upload is 4 bytes per trainable parameter).")] = 32.0,
) -> None:
    """Start the SuperLink on loopback and its Fleet gateway on --fleet-address, until
    Ctrl-C. Only the Fleet API faces the network (docs/deployment.md)."""
    from fedtune.deploy.address import DeployError, check_address, check_file
    from fedtune.deploy.certs import CertFiles
    from fedtune.deploy.local import SUPERLINK_ENV, gateway_command, superlink_command

    try:
        check_address(fleet_address, "--fleet-address")
        files = CertFiles(ca_cert=check_file(certs / "ca.crt", "--certs"),
                          server_cert=check_file(certs / "server.pem", "--certs"),
                          server_key=check_file(certs / "server.key", "--certs"),
                          node_keys=())
    except DeployError as exc:
        _fail(str(exc))
    if not 0 < port < 65536:
        _fail(f"--port must be 1-65535, got {port}")
    if not 0 < max_body_mb <= 4096:
        _fail(f"--max-body-mb must be in (0, 4096], got {max_body_mb}")
    from fedtune.deploy.fleet_gateway import Limits

    limits = Limits(max_body_bytes=int(max_body_mb * 2**20))
    env = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **os.environ,
           **SUPERLINK_ENV,
           # The SuperLink starts `flower-superexec` by name: the one next to this Python.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")])}
    procs = [subprocess.Popen(superlink_command(port, files), env=env)]
    procs.append(subprocess.Popen(
        gateway_command(fleet_address, f"127.0.0.1:{port}", files, limits), env=env))
    console.print(f"SuperLink on 127.0.0.1:{port} (Control, ServerAppIo: this machine only); "
                  f"Fleet API for SuperNodes on {fleet_address}; PIDs "
                  f"{', '.join(str(p.pid) for p in procs)}; Ctrl-C stops", highlight=False)
    code = _wait_and_stop(procs)
    if code:
        _fail(f"the SuperLink or its Fleet gateway exited with code {code} (see the log above)")


@deploy_app.command("sim-superlink")
def sim_superlink(
    port: Annotated[int, typer.Option(
        help="The SuperLink's port on 127.0.0.1 (`flwr run` connects to it).")] = 9093,
) -> None:
    """Start a simulation SuperLink for `flwr run`, everything on loopback (its Ray too),
    until Ctrl-C (docs/running.md: Running with `flwr run`)."""
    import tempfile

    from fedtune.deploy.local import SIMULATION_ENV, simulation_superlink_command
    from fedtune.runtime.local_ray import TMPDIR_ENV

    if not 0 < port < 65536:
        _fail(f"--port must be 1-65535, got {port}")
    with tempfile.TemporaryDirectory(prefix="fedtune-ray-") as ray_tmp:
        env = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **os.environ,
               **SIMULATION_ENV, TMPDIR_ENV: ray_tmp,  # Ray's session files, removed after
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")])}
        # Own process group: its SuperExec, flwr-simulation and Ray end with it.
        proc = subprocess.Popen(simulation_superlink_command(port), env=env,
                                start_new_session=True)
        console.print(f"simulation SuperLink on 127.0.0.1:{port} (PID {proc.pid}; its Ray on "
                      "loopback only); Ctrl-C stops", highlight=False)
        try:
            code = _wait_and_stop([proc])
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if code:
        _fail(f"the SuperLink exited with code {code} (see the log above)")


# Below stop_on_signals' watchdog (8 s), so what is still running is killed by us first.
STOP_GRACE_S = 6.0


def _wait_and_stop(procs: list[subprocess.Popen]) -> int:
    """Wait until Ctrl-C or one process exits, then end them all (by PID); returns the
    exit code of the one that ended first (0 after Ctrl-C)."""
    code = 0
    try:
        # Explicit handlers, not Python's default SIGINT one: a process started with SIGINT
        # ignored (nohup, a test runner's worker) gets none, and Ctrl-C would do nothing.
        with stop_on_signals():
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
        code = next(p.returncode for p in procs if p.returncode is not None)
    except (KeyboardInterrupt, RunInterrupted):
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        # One grace period for all of them (not one each), so Ctrl-C ends within seconds
        # however many processes are slow to stop; what is still running then is killed.
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


@deploy_app.command()
def supernode(
    superlink: Annotated[str, typer.Option(help="The SuperLink's address, HOST:PORT.")],
    root_certificates: Annotated[Path, typer.Option(
        help="The CA certificate (ca.crt) that signed the SuperLink's certificate.")],
    key: Annotated[Path, typer.Option(
        help="This node's private key (node-<i>); its .pub must be registered, and its TLS "
             "client certificate node-<i>.crt / node-<i>.key lie next to it.")],
    partition_id: Annotated[int, typer.Option(
        help="This client's id, 0 .. data.num_clients-1 (its corpus partition unless "
             "--data-path is given).")],
    data_path: Annotated[Path | None, typer.Option(
        help='Train on this JSONL file ({"text": ..., "label": ...} lines; {"text": ...} '
             "for task.kind causal_lm) instead of the partition.")] = None,
    runtime_port: Annotated[int, typer.Option(
        help="Loopback port of the SuperNode's Runtime API (one per node on a machine).")
    ] = 9094,
    poll: Annotated[float, typer.Option(
        help="Seconds between the SuperNode's polls of the SuperLink.")
    ] = RuntimeConfig.supernode_poll_s,
    worker: Annotated[bool, typer.Option(
        help="Serve messages from one long-lived ClientApp process (off: a new "
             "flwr-clientapp process per message, Flower's default).")] = True,
) -> None:
    """Start a SuperNode (and its ClientApp worker) until Ctrl-C or the SuperNode exits."""
    from fedtune.compat.flower_deploy import enabled
    from fedtune.deploy.address import DeployError, check_address, check_file

    try:
        check_address(superlink, "--superlink")
        ca = check_file(root_certificates, "--root-certificates")
        private = check_file(key, "--key")
        check_file(private.with_name(private.name + ".pub"), "--key's public key (.pub)")
        tls_cert = check_file(private.with_name(private.name + ".crt"),
                              "--key's TLS client certificate (.crt)")
        tls_key = check_file(private.with_name(private.name + ".key"),
                             "--key's TLS client key (.key)")
        if data_path is not None:
            data_path = check_file(data_path, "--data-path")
    except DeployError as exc:
        _fail(str(exc))
    if partition_id < 0:
        _fail(f"--partition-id must be >= 0, got {partition_id}")
    if not 0 < poll <= 3:
        _fail(f"--poll must be in (0, 3] seconds, got {poll}")
    node_config = f"partition-id={partition_id}"
    if data_path is not None:
        node_config += f' data-path="{data_path}"'
    args = [sys.executable, "-m", "fedtune.deploy.supernode", "--superlink", superlink,
            "--root-certificates", str(ca), "--auth-supernode-private-key", str(private),
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port),
            "--tls-client-cert", str(tls_cert), "--tls-client-key", str(tls_key)]
    worker = worker and enabled("long-lived-worker")  # else: logs Flower's fallback
    if worker:
        args += ["--isolation", "process"]
    env = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **os.environ,
           "FEDTUNE_SUPERNODE_POLL_S": str(poll), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(args, env=env)]
    if worker:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedtune.deploy.worker",
             "--runtime-api-address", f"127.0.0.1:{runtime_port}"], env=env))
    console.print(f"SuperNode (partition {partition_id}) -> {superlink}, "
                  f"PIDs {', '.join(str(p.pid) for p in procs)}; Ctrl-C stops")
    code = _wait_and_stop(procs)
    if code:
        _fail(f"the SuperNode or its worker exited with code {code} (see the log above; "
              "305: the SuperLink refused the node: is its public key registered?)")


@deploy_app.command()
def local(
    config: Annotated[Path, typer.Argument(help="Experiment TOML.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/deploy"),
    nodes: Annotated[int, typer.Option(help="SuperNodes (= data.num_clients).")] = 2,
) -> None:
    """The whole deployment on this machine: SuperLink with TLS and node authentication,
    `nodes` registered SuperNodes with workers, and `flwr run` of the experiment."""
    from fedtune.config import ConfigError, load_config
    from fedtune.deploy.address import DeployError
    from fedtune.deploy.local import LocalDeployment
    from fedtune.privacy.seeded_noise import refuse_seeded_noise
    from fedtune.run.folder import RunFolderError, claim_run_folder

    project = Path(__file__).resolve().parents[2]
    if not (project / "pyproject.toml").is_file():
        _fail(f"{project} has no pyproject.toml: `flwr run` needs the source checkout")
    overrides = list(set_ or [])
    import strategies.plugins  # noqa: F401  (plugin checks at load, as `fedtune run` does)

    try:
        cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    try:
        refuse_seeded_noise(cfg)
    except DeployError as exc:
        _fail(str(exc))
    try:  # the SuperNodes read no experiment config: they get the run's setting by name
        supernode_poll = runtime_settings(cfg).supernode_poll_s
    except ValueError as exc:  # a malformed FEDTUNE_SUPERNODE_POLL_S
        _fail(str(exc))
    if cfg.data.num_clients != nodes:
        _fail(f"data.num_clients={cfg.data.num_clients} but --nodes {nodes}: each SuperNode "
              f"is one client; add --set data.num_clients={nodes} or change --nodes")
    try:
        folder = claim_run_folder(out)  # checked and locked before anything starts
    except RunFolderError as exc:
        _fail(str(exc))
    out = out.resolve()
    deployment = LocalDeployment(out.parent / f"{out.name}-deployment", nodes=nodes,
                                 env={ENVIRONMENT["supernode_poll_s"]: str(supernode_poll)})
    console.print(f"starting SuperLink + {nodes} SuperNodes (logs: {deployment.root}/logs)")
    try:
        with stop_on_signals(), deployment:
            res = deployment.run(project, {"config": Path(config).resolve(),
                                           "overrides": shlex.join(overrides), "out": out},
                                 timeout=24 * 3600)
    except RunInterrupted as stop:
        _fail(f"stopped by {stop.name}; every process of the deployment has ended")
    finally:
        folder.release()
    if not (out / SUMMARY_FILE).exists():
        _fail(f"the run ended without {out}/{SUMMARY_FILE} (flwr run exit {res.returncode}):\n"
              f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    console.print(f"[bold green]done[/] -> {out}/summary.json")

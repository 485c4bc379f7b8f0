"""What listens on the network. Only a deployment's Fleet API may face other machines, and
only when asked; a local simulation (Ray's GCS, raylet, workers, the driver) and every other
part of a deployment listen on loopback. Measured from /proc on the real processes.

A local simulation's listeners are checked on a run another test starts anyway (a Flower
simulation costs tens of seconds): `test_sigterm_stops_the_run_without_leftovers` in
tests/test_lifecycle.py watches that run's processes and sockets."""

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from netstat import descendants, listeners

from fedtune.deploy.certs import node_cert_paths, write_certs
from fedtune.deploy.local import free_port, gateway_command

ROOT = Path(__file__).resolve().parents[1]


def _wait_listening(proc: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        found = listeners(descendants(proc.pid))
        if found:
            return found
        time.sleep(0.2)
    pytest.fail("nothing listened")


def test_documented_recipes_keep_the_superlink_on_loopback():
    """The README and every docs page: the recipes live in docs/running.md (`flwr run`)
    and docs/deployment.md (real SuperNodes)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = [c for c in blocks + spans if "flower-superlink" in c]
    assert any("--host 127.0.0.1" in c for c in commands), commands
    for command in commands:
        assert "0.0.0.0" not in command and "--host ::" not in command, command
    assert "fedtune deploy superlink" in (ROOT / "docs" / "deployment.md").read_text()
    assert "fedtune deploy sim-superlink" in (ROOT / "docs" / "running.md").read_text()


def test_fleet_gateway_listens_where_asked_and_forwards_only_the_fleet_api(tmp_path):
    certs = write_certs(tmp_path / "certs", nodes=1)
    port, closed = free_port(), free_port()  # nothing listens on `closed`: no SuperLink
    proc = subprocess.Popen(gateway_command(f"0.0.0.0:{port}", f"127.0.0.1:{closed}", certs),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = _wait_listening(proc)
        assert [(x.address, x.port) for x in found] == [("0.0.0.0", port)], found
        verify = ssl.create_default_context(cafile=str(certs.ca_cert))
        # The gateway requires a node's TLS client certificate (tests/test_gateway.py).
        verify.load_cert_chain(*(str(p) for p in node_cert_paths(certs.node_keys[0])))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify) as client:
            for method, path in (("POST", "/v1/control/register-node"),
                                 ("POST", "/v1/control/start-run"),
                                 ("POST", "/v1/runtime/acquire-task"),
                                 ("POST", "/v1/fleet/no-such-route"),
                                 ("GET", "/v1/fleet/pull-messages"), ("GET", "/docs")):
                assert client.request(method, path).status_code == 404, (method, path)
            # A Fleet route is forwarded: with no SuperLink behind it, 502.
            assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 502
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fleet_gateway_refuses_a_superlink_that_is_not_on_loopback(tmp_path):
    certs = write_certs(tmp_path / "certs", nodes=0)
    proc = subprocess.run(gateway_command("127.0.0.1:9092", "10.0.0.5:9093", certs),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--superlink: '10.0.0.5:9093' must be a loopback address" in proc.stderr


@pytest.mark.slow
def test_deploy_superlink_exposes_only_the_fleet_gateway(tmp_path):
    certs = write_certs(tmp_path / "certs", nodes=0)
    link_port, fleet_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    log = (tmp_path / "superlink.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "deploy", "superlink",
                             "--certs", str(certs.ca_cert.parent), "--port", str(link_port),
                             "--fleet-address", f"0.0.0.0:{fleet_port}"], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,
                            # Started with SIGINT ignored (as nohup or a test worker would):
                            # Ctrl-C must still stop it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
            found = listeners(descendants(proc.pid))
            if {x.port for x in found} >= {link_port, fleet_port}:
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
        exposed = sorted((x.address, x.port) for x in found if not x.loopback)
        assert exposed == [("0.0.0.0", fleet_port)], found
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# Equal partitions (iid): one noise calibration per process instead of one per client size.
FLWR_RUN_OVERRIDES = ("name=flwr-listen data.num_clients=2 train.clients_per_round=2 "
                      "train.rounds=1 train.local_steps=1 train.batch_size=8 model.max_length=16 "
                      "tuning.prompt.length=2 train.eval_max_examples=32 data.partition=iid")


@pytest.mark.slow
def test_flwr_run_on_the_readme_superlink_listens_on_loopback_only(tmp_path):
    """The README's `flwr run` path (issue 27 #4): a plain `flower-superlink --simulation`
    gave Ray's GCS, raylet, workers and flwr-simulation 8 sockets on all interfaces.
    `fedtune deploy sim-superlink` passes Ray's single-machine switch down; every socket of
    the whole tree (SuperLink, SuperExec, flwr-simulation, Ray) is read while a run lasts."""
    from fedtune.deploy.local import CONNECTION, flower_bin

    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\noptions.num-supernodes = 2\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the command must set it itself
    log = (tmp_path / "superlink.log").open("wb")
    link = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "deploy", "sim-superlink",
                             "--port", str(port)], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out = tmp_path / "run"
    run = None
    seen: dict[tuple, object] = {}
    commands: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while not {x.port for x in listeners(descendants(link.pid))} >= {port}:
            assert link.poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        run = subprocess.Popen(
            [flower_bin("flwr"), "run", str(ROOT), CONNECTION, "--stream", "--run-config",
             f"config='{ROOT / 'experiments' / 'quickstart.toml'}' "
             f"overrides='{FLWR_RUN_OVERRIDES}' out='{out}'"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            pids = descendants(link.pid)
            for pid in pids:
                try:
                    commands.add(Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            for x in listeners(pids):
                seen[(x.command, x.proto, x.address, x.port)] = x
            time.sleep(0.5)
        output = run.communicate(timeout=60)[0] if run.poll() is not None else "(timed out)"
        print("listening:", sorted(str(x) for x in seen.values()))
        assert (out / "summary.json").exists(), \
            f"{output[-3000:]}\n{(tmp_path / 'superlink.log').read_text()[-3000:]}"
        assert {"gcs_server", "raylet"} <= commands, commands  # Ray was watched
        assert len(seen) >= 4, seen
        exposed = [str(x) for x in seen.values() if not x.loopback]  # type: ignore[attr-defined]
        assert exposed == [], exposed
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        if link.poll() is None:
            os.kill(link.pid, signal.SIGINT)
            try:
                link.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(link.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        link.wait()
        log.close()

"""`fedtune run --ray-address`: the simulation on an existing Ray cluster, here a head and
one worker node started on loopback (1 CPU each, so each node hosts one ClientApp actor).
Both nodes run `ray start --block` in their own process group and are stopped by PID;
`ray stop` would also stop every other Ray instance on the machine."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedtune.deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
OVERRIDES = ["name=ray-cluster", "data.num_clients=2", "train.clients_per_round=2",
             "train.rounds=2", "train.local_steps=1", "train.batch_size=8",
             "model.max_length=16", "tuning.prompt.length=2", "train.eval_max_examples=32",
             "simulation.num_cpus_per_client=1"]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not listen on port {port} within {timeout:.0f} s")


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    probe = (f"import ray; ray.init(address={address!r}, logging_level='ERROR', "
             "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120)
    return int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # raylet, GCS and workers live in the same group: none may survive
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture
def ray_cluster():
    # Short: Ray puts Unix sockets under it, and those paths are limited to 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ftray", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address",
              "127.0.0.1", "--object-store-memory", str(100 * 2**20)]
    procs: list[subprocess.Popen] = []
    try:
        for name, args in (("head", ["--head", "--port", str(port), "--temp-dir", str(tmp),
                                     "--include-dashboard", "false"]),
                           ("worker", ["--address", address])):
            with open(tmp / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen([str(RAY), "start", *args, *common],
                                              stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
            if name == "head":  # the worker's `ray start` gives up if the GCS is not up yet
                wait_for_port(port, timeout=120)
        deadline = time.monotonic() + 180
        while _alive_nodes(address, env) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "".join((tmp / f"{n}.log").read_text() for n in ("head", "worker"))
                pytest.fail(f"the Ray cluster did not come up with 2 nodes:\n{logs[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        _stop(procs)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


@pytest.mark.slow
@pytest.mark.long
def test_run_on_an_existing_ray_cluster(ray_cluster, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fedtune.cli", "run", str(ROOT / "experiments/quickstart.toml"),
            "--out", str(out), "--ray-address", address]
    for item in OVERRIDES:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients"] == 2 and not r["failed"] for r in rounds)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2

"""Deployment on loopback: a SuperLink with TLS and SuperNode authentication, two
registered SuperNodes (each its own partition) running the same ServerApp and ClientApp as
the simulation, and a SuperNode with an unregistered key that must be refused. Every
process is started by `LocalDeployment` and stopped by PID, also when a test fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedtune.compat.flower_deploy import is_simulation_grid
from fedtune.deploy.address import DeployError, check_address, check_file
from fedtune.deploy.certs import write_certs
from fedtune.deploy.local import LocalDeployment

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ("name=deploy data.num_clients=2 train.clients_per_round=2 train.rounds=2 "
             "train.local_steps=1 train.batch_size=8 model.max_length=16 "
             "tuning.prompt.length=2 train.eval_max_examples=32 "
             "privacy.disclose_counts=true")  # the tests read each node's example count


def test_certs_chain_to_the_ca_and_cover_loopback(tmp_path):
    files = write_certs(tmp_path, hosts=["superlink.example", "10.0.0.5"], nodes=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(
        x509.IPAddress)}
    for key_path in files.node_keys:
        key = load_ssh_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key_path.with_name(key_path.name + ".pub").read_text().startswith(
            "ecdsa-sha2-nistp384 ")
        assert key_path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("address", ["http://127.0.0.1:9092", "127.0.0.1", "host:99999",
                                     ":9092", "127.0.0.1:0"])
def test_bad_addresses_are_named(address):
    with pytest.raises(DeployError, match="--superlink"):
        check_address(address, "--superlink")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DeployError, match=r"--root-certificates: no such file: .*ca\.crt"):
        check_file(tmp_path / "ca.crt", "--root-certificates")


def test_deploy_supernode_names_a_bad_address_and_missing_files(cli, tmp_path):
    files = write_certs(tmp_path, nodes=1)
    good = ["--root-certificates", str(files.ca_cert), "--key", str(files.node_keys[0]),
            "--partition-id", "0"]
    res = cli("deploy", "supernode", "--superlink", "https://127.0.0.1:9092", *good)
    assert res.code == 2 and "--superlink: 'https://127.0.0.1:9092' is not HOST:PORT" \
        in res.stdout
    res = cli("deploy", "supernode", "--superlink", "127.0.0.1:9092", *good[:2], "--key",
              str(tmp_path / "node-7"), "--partition-id", "0")
    assert res.code == 2 and "--key: no such file:" in res.stdout
    res = cli("deploy", "supernode", "--superlink", "127.0.0.1:9092", *good, "--data-path",
              str(tmp_path / "mine.jsonl"))
    assert res.code == 2 and "--data-path: no such file:" in res.stdout
    assert "Traceback" not in res.output


def test_deploy_certs_writes_the_files(cli, tmp_path):
    res = cli("deploy", "certs", str(tmp_path), "--host", "10.1.2.3", "--nodes", "1")
    assert res.code == 0, res.output
    assert {p.name for p in tmp_path.iterdir()} == {
        "ca.crt", "ca.key", "server.pem", "server.key", "node-0", "node-0.pub",
        "node-0.crt", "node-0.key"}  # the node's TLS client certificate for the gateway


@pytest.mark.parametrize(("args", "needle"), [
    (["--nodes", str(10**21)], "--nodes must be an integer in [0, 10000]"),
    (["--nodes", "10001"], "--nodes must be an integer in [0, 10000]"),
    (["--days", str(10**9)], "--days must be an integer in [1, 3650]"),
    (["--days", "0"], "--days must be an integer in [1, 3650]"),
])
def test_deploy_certs_counts_and_days_are_bounded(cli, tmp_path, args, needle):
    # --nodes 10**21 grew to 5.4 GB; --days 1e9 ended in a traceback.
    res = cli("deploy", "certs", str(tmp_path / "c"), *args)
    assert res.code == 2 and needle in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "c").exists()


def test_node_client_certificates_are_for_client_use_and_chain_to_the_ca(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from fedtune.deploy.certs import node_cert_paths

    files = write_certs(tmp_path, nodes=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    for key in files.node_keys:
        cert_path, key_path = node_cert_paths(key)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert key_path.stat().st_mode & 0o077 == 0


def test_worker_rejects_a_bad_address_before_importing_the_app():
    proc = subprocess.run([sys.executable, "-m", "fedtune.deploy.worker",
                           "--runtime-api-address", "https://127.0.0.1:9094"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--runtime-api-address" in proc.stderr


NODE_FILE_EXAMPLES = 40


def _write_node_file(path: Path) -> Path:
    """A node's own data: the first training examples of the corpus, labels by name."""
    from fedtune.data import load_corpus

    train = load_corpus("spamassassin")["train"].select(range(NODE_FILE_EXAMPLES))
    names = train.features["label"].names
    path.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n"
                            for t, y in zip(train["text"], train["label"], strict=True)))
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    own = _write_node_file(root / "node-1-data.jsonl")
    # Node 0 trains on its corpus partition, node 1 on its own file.
    deployment = LocalDeployment(root, nodes=2, node_configs=[
        "partition-id=0", f'partition-id=1 data-path="{own}"'])
    with deployment:
        yield deployment


def _two_clean_rounds(deployment, out: Path, overrides: str) -> list[dict]:
    """Run the quickstart config with `overrides` on the deployment; its two rounds, each
    with both clients and nothing failed or rejected."""
    res = deployment.run(ROOT, {"config": ROOT / "experiments" / "quickstart.toml",
                                "overrides": overrides, "out": out}, timeout=600)
    assert (out / "summary.json").exists(), \
        f"{res.stdout[-3000:]}{res.stderr[-3000:]}\n{deployment.logs()}"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients"] == 2 and not r["failed"] and not r["rejected"]
    return rounds


@pytest.mark.slow
def test_two_rounds_on_two_authenticated_supernodes(deployment):
    out = deployment.root / "run"
    rounds = _two_clean_rounds(deployment, out, OVERRIDES)
    for r in rounds:
        assert sorted(c["partition_id"] for c in r["per_client"]) == [0, 1]
        assert r["bytes_up"] > 0 and r["epsilon_sample"] is not None
        by_pid = {c["partition_id"]: c for c in r["per_client"]}
        assert by_pid[1]["num_examples"] == NODE_FILE_EXAMPLES
        assert by_pid[0]["num_examples"] != NODE_FILE_EXAMPLES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["method"] == "prompt"
    assert (out / "config.toml").exists() and (out / "final_state.safetensors").exists()


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(deployment):
    node = deployment.unregistered_supernode(max_retries=0)
    try:
        code = node.popen.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode is still running:\n{node.output()[-3000:]}")
    assert code != 0
    assert "Failed to activate SuperNode" in node.output(), node.output()[-3000:]


@pytest.mark.slow
def test_deploy_supernode_command_reports_the_refusal(deployment):
    from fedtune.deploy.certs import load_ca, write_node_key
    from fedtune.deploy.local import free_port

    key = write_node_key(deployment.root / "certs" / "node-stranger",
                         ca=load_ca(deployment.root / "certs"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "deploy", "supernode",
         "--superlink", f"127.0.0.1:{deployment.port}",
         "--root-certificates", str(deployment.certs.ca_cert), "--key", str(key),
         "--partition-id", "0", "--runtime-port", str(free_port())],
        capture_output=True, text=True, timeout=300, env=deployment.environ(),
        cwd=deployment.root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Failed to activate SuperNode" in out and "is its public key registered?" in out


class _SlowGrid:
    """Replies to message i become available `delays[i]` seconds after the push."""

    def __init__(self, delays):
        self.delays = delays

    def push_messages(self, messages):
        import time

        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        import time
        from types import SimpleNamespace

        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if now >= self.delays[int(i[1:])]]


def test_send_and_receive_polls_at_the_configured_interval(monkeypatch):
    import time

    from strategies.grid_io import send_and_receive

    monkeypatch.setenv("FEDTUNE_GRID_POLL_S", "0.02")
    # Flower's grid module is imported on first use (0.5 s): not part of the polling timed.
    is_simulation_grid(object())
    t0 = time.monotonic()
    replies = send_and_receive(_SlowGrid([0.05, 0.1]), ["a", "b"], timeout=10)
    assert len(replies) == 2 and time.monotonic() - t0 < 1.0  # Flower's grid: >= 3 s
    replies = send_and_receive(_SlowGrid([0.0, 60.0]), ["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]  # late one left out


def test_poll_intervals_are_validated(monkeypatch):
    from fedtune.deploy import supernode
    from strategies import grid_io

    monkeypatch.setenv("FEDTUNE_GRID_POLL_S", "fast")
    with pytest.raises(ValueError, match="FEDTUNE_GRID_POLL_S='fast'"):
        grid_io.poll_interval()
    monkeypatch.setenv("FEDTUNE_SUPERNODE_POLL_S", "0")
    with pytest.raises(SystemExit, match="FEDTUNE_SUPERNODE_POLL_S='0'"):
        supernode.poll_interval()


@pytest.fixture
def fresh_notes(monkeypatch):
    """Fallback log lines are written once per process: forget earlier ones."""
    from fedtune.compat import flower_deploy

    monkeypatch.setattr(flower_deploy, "_noted", set())
    return flower_deploy


@pytest.mark.parametrize("version", ["1.41.0", "1.42.0"])
def test_supernode_poll_cap_patches_tested_flower_versions(monkeypatch, fresh_notes, version):
    import time

    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    assert fresh_notes.cap_supernode_polls(0.01, version=version)
    t0 = time.monotonic()
    start_client_internal.time.sleep(3)  # what the SuperNode's idle loop asks for
    assert time.monotonic() - t0 < 0.5
    assert start_client_internal.time.monotonic() > 0  # the rest of `time` is untouched


def test_supernode_poll_cap_leaves_an_untested_flower_alone(monkeypatch, fresh_notes, caplog):
    import time

    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
    with caplog.at_level("WARNING", logger=fresh_notes.__name__):
        assert not fresh_notes.cap_supernode_polls(0.01, version="1.43.0")
        assert not fresh_notes.cap_supernode_polls(0.01, version="1.43.0")
    assert start_client_internal.time is time
    assert [r.getMessage() for r in caplog.records] == [
        "fedtune: Flower 1.43.0 is untested for supernode-poll-cap (tested: 1.41, 1.42); "
        "using plain flower-supernode (3 s / 0.5 s poll sleeps)"]


def test_supernode_entry_point_runs_flowers_console_script(monkeypatch):
    from fedtune.deploy import supernode

    seen = []
    monkeypatch.setattr(supernode, "cap_supernode_polls", seen.append)
    monkeypatch.setattr(supernode, "console_script",
                        lambda name: lambda: seen.append((name, list(sys.argv))))
    monkeypatch.setattr(sys, "argv", ["x"])
    monkeypatch.setenv("FEDTUNE_SUPERNODE_POLL_S", "0.25")
    supernode.main(["--insecure"])
    assert seen == [0.25, ("flower-supernode", ["flower-supernode", "--insecure"])]
    # The function behind Flower's declared `flower-supernode` script is found.
    assert callable(supernode.console_script("flower-supernode"))


@pytest.fixture
def runtime_api():
    """Flower's own SuperNode Runtime API (in-memory state, no tasks) on a loopback port."""
    import threading
    import time

    import uvicorn
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    from fedtune.deploy.local import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(state_factory=NodeStateFactory(ObjectStoreFactory())), host="127.0.0.1",
        port=port, log_level="warning", workers=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "Flower's Runtime API did not start"
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


LATENCY_APP = ROOT / "benchmarks" / "deploy_latency_app"


def test_worker_asks_flowers_runtime_api_for_tasks(runtime_api):
    from fedtune.deploy.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(runtime_api, app_ref="latency_app:client",
                                 app_dir=LATENCY_APP))
    try:
        assert worker.identity == ("fedtune/deploy-latency", "0.1.0")
        assert worker.run_once() is False  # the SuperNode understood: no task for us
    finally:
        worker.close()


def test_worker_refuses_an_untested_flower(monkeypatch, fresh_notes, capsys):
    from fedtune.deploy import worker

    monkeypatch.setattr(fresh_notes, "flower_version", lambda: "1.43.0")
    with pytest.raises(fresh_notes.UnsupportedFlower, match="installed 1.43.0"):
        fresh_notes.RuntimeApi("127.0.0.1:9094")
    with pytest.raises(SystemExit) as stop:
        worker.main(["--runtime-api-address", "127.0.0.1:9094"])
    assert stop.value.code == 2
    assert "start the SuperNode without --isolation process" in capsys.readouterr().err


@pytest.mark.parametrize(("version", "worker"), [("1.41.0", True), ("1.42.1", True),
                                                 ("1.43.0", False), ("2.0.0", False)])
def test_local_deployment_uses_the_worker_only_on_tested_flower(
        monkeypatch, fresh_notes, tmp_path, version, worker):
    """Elsewhere each SuperNode runs Flower's own `flwr-clientapp` per message."""
    from fedtune.deploy.certs import CertFiles

    monkeypatch.setattr(fresh_notes, "flower_version", lambda: version)
    spawned = []
    deployment = LocalDeployment(tmp_path, certs=CertFiles(tmp_path / "ca", tmp_path / "s",
                                                           tmp_path / "k", ()))
    monkeypatch.setattr(deployment, "_spawn", lambda name, args: spawned.append((name, args)))
    deployment.start_supernode(0, tmp_path / "node-0", "partition-id=0")
    names = [name for name, _ in spawned]
    assert names == (["supernode-0", "worker-0"] if worker else ["supernode-0"])
    node_args = spawned[0][1]
    assert node_args[1:3] == ["-m", "fedtune.deploy.supernode"]  # the poll cap decides itself
    assert ("--isolation" in node_args) is worker


def test_seeded_noise_check_tells_the_simulation_grid_apart():
    from flwr.superlink.grid import InMemoryGrid

    from fedtune.compat.flower_deploy import is_simulation_grid

    assert is_simulation_grid(InMemoryGrid.__new__(InMemoryGrid))
    assert not is_simulation_grid(object())


def test_flower_private_names_only_in_the_compat_module():
    """fedtune/deploy imports Flower's public packages only (flwr.app, flwr.clientapp,
    flwr.common's exports); private ones go through fedtune.compat.flower_deploy."""
    import ast

    public = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.common"}
    found = []
    for path in sorted((ROOT / "fedtune" / "deploy").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
                found.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.startswith("flwr")]
    assert [f for f in found if f[1] not in public] == []


@pytest.mark.slow
def test_only_loopback_listens_and_the_gateway_hides_the_control_api(deployment):
    import ssl

    import httpx
    from netstat import descendants, listeners

    pids = set().union(*(descendants(p.popen.pid) for p in deployment.procs))
    found = listeners(pids)
    assert {x.port for x in found} >= {deployment.port, deployment.fleet_port}
    assert not [str(x) for x in found if not x.loopback], found
    from fedtune.deploy.certs import node_cert_paths

    verify = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    # Even a node's TLS client certificate does not open the Control API on the gateway.
    verify.load_cert_chain(*(str(p) for p in node_cert_paths(deployment.certs.node_keys[0])))
    path = "/v1/control/register-node"  # how an outsider registered its own key
    with httpx.Client(verify=verify) as client:
        assert client.post(f"https://127.0.0.1:{deployment.fleet_port}{path}",
                           content=b"").status_code == 404
        # The same route on the SuperLink's own (loopback) port exists.
        assert client.post(f"https://127.0.0.1:{deployment.port}{path}",
                           content=b"").status_code != 404


def test_deploy_local_refuses_seeded_noise(cli, tmp_path):
    res = cli("deploy", "local", "experiments/quickstart.toml", "--out", str(tmp_path / "r"),
              "--set", "data.num_clients=2", "--set", "train.clients_per_round=2",
              "--set", "privacy.reproducible_noise=true")
    assert res.code == 2, res.output
    assert "error: privacy.reproducible_noise = true: seeded noise is for simulation studies " \
           "only" in res.stdout
    assert not (tmp_path / "r").exists() and "Traceback" not in res.output


def test_seeded_noise_is_refused_outside_the_simulation_engine():
    from flwr.superlink.grid import InMemoryGrid

    from fedtune.config import load_config
    from fedtune.privacy.seeded_noise import SeededNoiseRefused, check_server_runtime

    seeded = load_config(ROOT / "experiments" / "quickstart.toml",
                         ["privacy.reproducible_noise=true"])
    secret = load_config(ROOT / "experiments" / "quickstart.toml", [])
    with pytest.raises(SeededNoiseRefused, match="seeded noise is for simulation studies"):
        check_server_runtime(seeded, object())  # a deployment's grid
    check_server_runtime(secret, object())
    check_server_runtime(seeded, InMemoryGrid.__new__(InMemoryGrid))  # the simulation's


def _write_lm_node_file(path: Path) -> Path:
    """A language model's node file: the first ham texts of the corpus, texts only."""
    from fedtune.data import load_corpus

    train = load_corpus("spamassassin")["train"]
    ham = [t for t, y in zip(train["text"], train["label"], strict=True) if y == 0]
    path.write_text("".join(json.dumps({"text": t}) + "\n"
                            for t in ham[:NODE_FILE_EXAMPLES]))
    return path


# long: the README command keeps one deployment e2e per path; this is the LM's own-file case
@pytest.mark.slow
@pytest.mark.long
def test_a_causal_lm_node_trains_on_its_own_texts_in_a_deployment(tmp_path, lm_folders):
    """Issue 29 in a deployment: node 1 trains a tiny random Llama on its own texts-only
    file (its count reported at discovery), node 0 on its corpus partition."""
    own = _write_lm_node_file(tmp_path / "node-1-texts.jsonl")
    overrides = (f"{OVERRIDES} name=deploy-lm task.kind=causal_lm data.partition=iid "
                 f'model.backbone="\\"{lm_folders["llama"]}\\"" task.generation_examples=0')
    # (shlex reads that as model.backbone="<folder>"; a single quote cannot be passed)
    with LocalDeployment(tmp_path, nodes=2, node_configs=[
            "partition-id=0", f'partition-id=1 data-path="{own}"']) as deployment:
        out = tmp_path / "run"
        rounds = _two_clean_rounds(deployment, out, overrides)
    for r in rounds:
        by_pid = {c["partition_id"]: c for c in r["per_client"]}
        assert by_pid[1]["num_examples"] == NODE_FILE_EXAMPLES
        assert r["val_perplexity"] is not None and r["val_accuracy"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_perplexity"] is not None and summary["final_accuracy"] is None

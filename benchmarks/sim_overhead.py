"""Framework overhead of `fedtune run` (Flower simulation engine on Ray) against a bare
PyTorch loop doing the same local work.

Both sides run as child processes of this script, from the same config and overrides:
- **fedtune**: `python -m fedtune.cli run CONFIG --set ...` (the real path: Flower's
  simulation engine, Ray actors, Messages, DeltaFedAvg, the ledger).
- **bare**: this script with `--bare`: no Flower, no Ray. A `multiprocessing` pool of
  worker processes plays the clients and the parent plays the server.

The work is the same on both sides: the same cohorts (drawn by `DeltaFedAvg.sample`), the
same `clients.train.local_train` calls with the same seeds (`client_seed`) and learning
rates, the same delta codec, the same example-weighted mean, and the same central
evaluation (`fedtune.task.evaluation.evaluate`) after every round. Both end at the same accuracy
(printed, as a check that the work really was equal).

Parallelism is matched: Ray runs `simulation.num_cpus / num_cpus_per_client` actors (2 x 1
on a 2-core machine), each with torch on `num_cpus_per_client` threads, and hands each
sampled client to the next free actor. The bare pool has the same number of processes, the
same torch threads, and also hands clients to the next free worker (chunksize 1). The
server side (aggregation, evaluation) runs in the parent with torch's default threads on
both sides, as the ServerApp does in the `fedtune run` driver. Each worker (actor or pool
process) keeps one model and reloads the global vector into it, which is the fastest a
client can do; anything slower on the fedtune side is framework overhead.

Timings come from each side's `rounds.jsonl` (`wall_s`: send -> aggregate -> evaluate).
`wall_s` leaves out what the ServerApp does between rounds (checkpoint, ledger line,
drawing the cohort), so the time between the first and the last ledger line appearing is
printed too ("by ledger-line arrival", watched every 0.05 s).
Start-up is the time from launching the child process to the end of round 1, minus one
steady round (the median of the later ones): imports, Ray and actor start-up, task
building. Runs alternate fedtune, bare, bare, fedtune, ... (`--repeats`) so drift on a
shared machine hits both sides alike. The last line is
`ratio=X` = sum of fedtune `wall_s` over rounds 2.. / the same sum for bare.

    python benchmarks/sim_overhead.py [--config experiments/quickstart.toml]
        [--set key=value ...] [--dp] [--repeats 2] [--markdown benchmarks/RESULTS.md]

`--discovery N` measures instead how long Flower's simulation engine takes to hand out
fedtune's discovery (one partition query to each of N virtual clients, the real ClientApp's
query handler on 2 Ray actors) and then one query round to a cohort of 4, in this process,
with fedtune's message hand-out (`fedtune.compat.flower_sim`) or, with `--flower-dispatch`,
Flower's own loop:

    python benchmarks/sim_overhead.py --discovery 1000 [--flower-dispatch] [--no-ray]

`--no-ray` runs the engine with an in-thread backend (the engine's message path only);
`--hand-out N` times one tick of each hand-out on a LinkState holding a message per node.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# A medium workload: enough local work per round that a ratio means something, small enough
# to finish on two loaded cores. Override with --set.
DEFAULT_SETS = [
    "data.num_clients=20", "train.clients_per_round=4", "train.rounds=4",
    "train.local_steps=5", "train.batch_size=16", "model.max_length=64",
    "train.eval_max_examples=256",
]
NO_DP = ["privacy.sample.enabled=false", "privacy.user.enabled=false"]


# -- the bare side -----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg_toml: str, threads: int) -> None:
    """Once per pool process, as an actor does on its first message: torch settings, the
    task (backbone, tokens, partitions) and one model."""
    from fedtune.config import config_from_toml
    from fedtune.runtime.torch_setup import configure_torch
    from fedtune.task.task import get_task

    configure_torch(num_threads=threads)
    cfg = config_from_toml(cfg_toml)
    task = get_task(cfg)
    _WORKER.update(cfg=cfg, task=task, model=task.new_model())


def _train_client(job: tuple[int, int, Any, float, dict | None]) -> dict[str, Any]:
    """One client's round: load the global vector, `local_train`, encoded delta."""
    import numpy as np

    from clients.handlers import client_seed
    from clients.train import local_train
    from fedtune.privacy import DPHistory
    from fedtune.wire.delta import decode, encode

    pid, rnd, global_vec, lr, history_lists = job
    cfg, task, model = _WORKER["cfg"], _WORKER["task"], _WORKER["model"]
    model.load_trainable(task.spec.unflatten(global_vec))
    history = DPHistory.from_lists(history_lists) if history_lists else DPHistory()
    data = task.client_data(pid)
    result = local_train(model, data, cfg, history, seed=client_seed(cfg.seed, rnd, pid), lr=lr)
    delta = task.spec.flatten(model.trainable_state()) - global_vec
    # Through the wire codec and back, as the server sees it.
    delta = decode(encode(delta, cfg.delta.encoding, task.spec), task.spec)
    return {"pid": pid, "delta": np.asarray(delta), "num_examples": len(data),
            "loss": result.loss, "history": history.to_lists() if history.entries else None}


def run_bare(cfg_toml: str, out: Path) -> None:
    """The federated loop without Flower or Ray; writes `out/rounds.jsonl` like the ledger."""
    import numpy as np

    from fedtune.config import config_from_toml
    from fedtune.runtime.torch_setup import configure_torch
    from fedtune.task.evaluation import final_metrics, initial_metrics, round_metrics
    from fedtune.task.task import get_task
    from strategies.delta_fedavg import DeltaFedAvg

    cfg = config_from_toml(cfg_toml)
    sim = cfg.simulation
    workers = max(1, int((sim.num_cpus or os.cpu_count() or 1) // sim.num_cpus_per_client))
    threads = max(1, int(sim.num_cpus_per_client))
    configure_torch()
    task = get_task(cfg)
    model = task.new_model()
    # Spawned like Ray's workers: each imports and builds its task itself, and gets
    # OMP_NUM_THREADS set to its CPUs, as Ray sets it for an actor.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (cfg_toml, threads))
    strategy = DeltaFedAvg(task.spec, cfg.train.clients_per_round, cfg.seed)
    strategy.roster = {pid: pid for pid in range(cfg.data.num_clients)}
    vector = task.initial_vector()
    histories: dict[int, dict] = {}

    # The ServerApp's own evaluation calls: the untrained model on test and validation,
    # validation after every round, the final model on test once.
    initial_metrics(task, model, vector, cfg)
    out.mkdir(parents=True, exist_ok=True)
    with pool, (out / "rounds.jsonl").open("w") as ledger:
        for rnd in range(1, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            lr = cfg.train.lr * cfg.train.lr_decay ** (rnd - 1)
            cohort = sorted(strategy.sample(rnd, None))
            jobs = [(pid, rnd, vector, lr, histories.get(pid)) for pid in cohort]
            replies = sorted(pool.imap_unordered(_train_client, jobs, chunksize=1),
                             key=lambda r: r["pid"])
            for r in replies:
                if r["history"] is not None:
                    histories[r["pid"]] = r["history"]
            w = np.asarray([r["num_examples"] for r in replies], dtype=np.float64)
            deltas = np.stack([r["delta"] for r in replies]).astype(np.float64)
            vector = (vector + (deltas * (w / w.sum())[:, None]).sum(0)).astype(np.float32)
            record = {"round": rnd, **round_metrics(task, model, vector, cfg),
                      "clients": len(replies), "wall_s": time.perf_counter() - t0}
            ledger.write(json.dumps(record) + "\n")
            ledger.flush()
    final = final_metrics(task, model, vector, cfg)
    (out / "summary.json").write_text(json.dumps({"final_accuracy": final["accuracy"]}))


# -- discovery at scale ---------------------------------------------------------------------

def run_discovery(config: Path, num_nodes: int, flower_dispatch: bool, sets: list[str]
                  ) -> dict[str, Any]:
    """Discovery of `num_nodes` virtual clients, then a 4-node query round, through
    `fedtune.compat.flower_sim.run_inprocess` on a loopback Ray with 2 actors."""
    from fedtune.config import load_config
    from fedtune.runtime.local_ray import prefer_loopback
    from fedtune.sim.driver import _ray_scope, backend_config, quiet_environment, start_ray

    quiet_environment()
    prefer_loopback()
    import logging

    import ray
    from flwr.app import Message, MessageType
    from flwr.serverapp import ServerApp

    from clients.handlers import build_client_app
    from fedtune.compat.flower_sim import fast_dispatch_installed, install_fast_dispatch
    from fedtune.wire.protocol import PartitionQuery, PartitionReply
    from strategies.grid_io import send_and_receive

    if not flower_dispatch:
        install_fast_dispatch()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = load_config(config, [*sets, f"data.num_clients={num_nodes}", "simulation.num_cpus=2"])
    result: dict[str, Any] = {"nodes": num_nodes, "fedtune_dispatch": fast_dispatch_installed()}
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        t0 = time.perf_counter()
        while len(nodes := sorted(grid.get_node_ids())) < num_nodes:
            time.sleep(0.05)
        queries = [Message(content=PartitionQuery().to_record(),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = send_and_receive(grid, queries, timeout=3600)
        result["discovery_s"] = time.perf_counter() - t0
        result["replies"] = sum(1 for r in replies if not r.has_error())
        result["partitions"] = len({PartitionReply.from_record(r.content, num_nodes)
                                    .partition_id for r in replies if not r.has_error()})
        t1 = time.perf_counter()
        cohort = [Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                          dst_node_id=n) for n in nodes[:4]]
        result["cohort_replies"] = len(send_and_receive(grid, cohort, timeout=3600))
        result["query_round_s"] = time.perf_counter() - t1

    from fedtune.compat.flower_sim import run_inprocess

    with tempfile.TemporaryDirectory(prefix="fedtune-") as tmp:
        try:
            with _ray_scope(cfg, Path(tmp)):
                t_start = time.perf_counter()
                start_ray(cfg)
                run_inprocess(app, build_client_app(cfg), num_nodes, backend_config(cfg))
                result["total_s"] = time.perf_counter() - t_start
        finally:
            if ray.is_initialized():
                ray.shutdown()
    return result


def _watch(args: list[str], rounds_file: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run a child; note when each line of its rounds.jsonl appears."""
    t0 = time.perf_counter()
    log = rounds_file.parent.with_suffix(".log")
    rounds_file.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        arrived: list[float] = []
        while proc.poll() is None:
            if rounds_file.exists():
                n = len(rounds_file.read_text().splitlines())
                arrived += [time.perf_counter() - t0] * (n - len(arrived))
            time.sleep(0.05)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{args[:4]} failed ({proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    rounds = [json.loads(x) for x in rounds_file.read_text().splitlines()]
    arrived += [total] * (len(rounds) - len(arrived))
    walls = [r["wall_s"] for r in rounds]
    steady = statistics.median(walls[1:]) if len(walls) > 1 else 0.0
    return {"walls": walls, "first_round_end": arrived[0], "startup": arrived[0] - steady,
            # Rounds 2.. as seen from outside: everything between two ledger lines
            # (checkpoint, ledger write, sampling), not only what `wall_s` times.
            "later_by_arrival": arrived[-1] - arrived[0],
            # Both sides score the validation split every round and the final model on the
            # test split once (summary.json).
            "total": total, "last_val_accuracy": rounds[-1]["val_accuracy"],
            "final_accuracy": json.loads((rounds_file.parent / "summary.json").read_text())[
                "final_accuracy"]}


def run_fedtune(config: Path, sets: list[str], out: Path, env: dict[str, str]
                ) -> dict[str, Any]:
    args = [sys.executable, "-m", "fedtune.cli", "run", str(config), "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    return _watch(args, out / "rounds.jsonl", env)


def run_bare_child(config: Path, sets: list[str], out: Path, env: dict[str, str]
                   ) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--bare", str(out),
            "--config", str(config)]
    for item in sets:
        args += ["--set", item]
    return _watch(args, out / "rounds.jsonl", env)


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments/quickstart.toml")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="config override for both sides (repeatable)")
    parser.add_argument("--dp", action="store_true",
                        help="keep the config's DP settings (default: DP off, to isolate the "
                             "framework's overhead)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs, alternating fedtune/bare order (ABBA...)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--bare", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--discovery", type=int, default=0, metavar="N",
                        help="measure discovery of N virtual clients instead (see above)")
    parser.add_argument("--flower-dispatch", action="store_true",
                        help="with --discovery: Flower's own message hand-out")
    parser.add_argument("--no-ray", action="store_true",
                        help="with --discovery: Flower's engine with an in-thread backend")
    parser.add_argument("--hand-out", type=int, default=0, metavar="N",
                        help="time one tick of the message hand-out for N nodes, no Ray")
    args = parser.parse_args()
    if args.hand_out:
        from flower_engine import time_hand_out  # benchmarks/ is on sys.path as the script's folder

        from fedtune.compat.flower_sim import flower_version

        res = time_hand_out(args.hand_out)
        print(f"flwr {flower_version()}, load avg {_load_avg()}: "
              + json.dumps({k: round(v, 4) for k, v in res.items()}))
        return
    if args.discovery:
        from flower_engine import engine_discovery

        from fedtune.compat.flower_sim import flower_version

        # The pause between pulls: runtime.grid_poll_s "auto", 0.02 s on the simulation's
        # grid (strategies.grid_io), as in `fedtune run`.
        res = (engine_discovery(args.discovery, args.flower_dispatch) if args.no_ray else
               run_discovery(args.config, args.discovery, args.flower_dispatch, args.sets))
        print(f"flwr {flower_version()}, load avg {_load_avg()}: " + json.dumps(res))
        return

    from fedtune.config import load_config

    sets = DEFAULT_SETS + ([] if args.dp else NO_DP) + args.sets
    if args.bare is not None:  # child mode
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        run_bare(load_config(args.config, sets).to_toml(), args.bare)
        return
    from fedtune.compat.flower_sim import flower_version

    cfg = load_config(args.config, sets)  # fail here on a bad override, not in a child
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = args.out or Path(tempfile.mkdtemp(prefix="sim-overhead-"))
    print(f"config {args.config.name} + {' '.join(sets)}")
    print(f"{cfg.data.num_clients} clients, {cfg.train.clients_per_round}/round, "
          f"{cfg.train.rounds} rounds, {cfg.train.local_steps} steps of batch "
          f"{cfg.train.batch_size} x {cfg.model.max_length} tokens, DP "
          f"{'on' if cfg.privacy.sample.enabled else 'off'}, {os.cpu_count()} cores, "
          f"flwr {flower_version()}; "
          f"load avg before: {_load_avg()}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"fedtune": [], "bare": []}
    runners = {"fedtune": run_fedtune, "bare": run_bare_child}
    for rep in range(args.repeats):
        order = ["fedtune", "bare"] if rep % 2 == 0 else ["bare", "fedtune"]
        for side in order:
            res = runners[side](args.config, sets, out / f"{side}-{rep}", env)
            res["load"] = _load_avg()
            results[side].append(res)
            print(f"{side:>8} #{rep}: start-up {res['startup']:6.2f} s (round 1 ended at "
                  f"{res['first_round_end']:.2f} s), rounds "
                  f"{' '.join(f'{w:.2f}' for w in res['walls'])} s, final acc "
                  f"{res['final_accuracy']:.4f}, load avg {res['load']}", flush=True)
    later = {side: sum(sum(r["walls"][1:]) for r in rs) for side, rs in results.items()}
    arrival = {side: sum(r["later_by_arrival"] for r in rs) for side, rs in results.items()}
    startup = {side: statistics.median(r["startup"] for r in rs) for side, rs in results.items()}
    same = all(f[key] == b[key] for key in ("final_accuracy", "last_val_accuracy")
               for f, b in zip(results["fedtune"], results["bare"], strict=True))
    ratio = later["fedtune"] / later["bare"]
    table = "\n".join([
        "| side | start-up s (median) | rounds 2.. `wall_s` sum | rounds 2.. by ledger-line "
        "arrival | final test acc |",
        "|---|---:|---:|---:|---:|",
        *(f"| {side} | {startup[side]:.2f} | {later[side]:.2f} | {arrival[side]:.2f} | "
          f"{results[side][-1]['final_accuracy']:.4f} |" for side in ("fedtune", "bare")),
    ])
    print("\n" + table)
    print(f"\nsame last-round validation and final test accuracy on both sides: {same}")
    print(f"ratio by ledger-line arrival: {arrival['fedtune'] / arrival['bare']:.3f}")
    print(f"first-round start-up (fedtune): {startup['fedtune']:.2f} s (goal <= 8 s)")
    if args.markdown:
        from communication import write_section

        write_section(args.markdown, "sim_overhead", table + f"\n\nratio={ratio:.3f}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()

"""Per-round overhead of a loopback deployment (SuperLink + 2 SuperNodes, TLS and
SuperNode authentication on) with a trivial ClientApp that echoes a 1,000-float vector.

    python benchmarks/deploy_latency.py            # fedtune's settings (see README)
    python benchmarks/deploy_latency.py --defaults # Flower's defaults (1.41, 1.42)
    python benchmarks/deploy_latency.py --public-only
                        # fedtune's settings without the Flower patches of
                        # fedtune.compat.flower_deploy (what an untested Flower version gets)
    python benchmarks/deploy_latency.py --no-worker --supernode-poll 3 --grid-poll 0.1
                                                   # one setting at a time

Prints each round's wall time; the last line is `seconds_per_round=X`, the median over
rounds 2..R (round 1 also pays for the first ClientApp start-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedtune.compat.flower_deploy import enabled, flower_version  # noqa: E402
from fedtune.deploy.local import LocalDeployment  # noqa: E402

APP = ROOT / "benchmarks" / "deploy_latency_app"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--defaults", action="store_true",
                        help="Flower's defaults: flwr-clientapp per message, 3 s polling")
    parser.add_argument("--public-only", action="store_true",
                        help="no Flower patches: no worker, SuperNode sleeps not capped "
                             "(the fallback on an untested Flower version)")
    parser.add_argument("--no-worker", action="store_true",
                        help="a new flwr-clientapp process per message (subprocess isolation)")
    parser.add_argument("--supernode-poll", type=float, default=None,
                        help="FEDTUNE_SUPERNODE_POLL_S (default 0.1; Flower: 3)")
    parser.add_argument("--grid-poll", type=float, default=None,
                        help="FEDTUNE_GRID_POLL_S (default 0.1; Flower: 3)")
    args = parser.parse_args()
    env = {}
    if args.public_only:
        # A cap of 3 s is no cap: Flower's SuperNode sleeps 3 s or 0.5 s.
        args.no_worker, args.supernode_poll = True, args.supernode_poll or 3.0
    if args.supernode_poll is not None:
        env["FEDTUNE_SUPERNODE_POLL_S"] = str(args.supernode_poll)
    if args.grid_poll is not None:
        env["FEDTUNE_GRID_POLL_S"] = str(args.grid_poll)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is not counted)")
    with tempfile.TemporaryDirectory(prefix="fedtune-latency-") as tmp:
        root = Path(tmp)
        out = root / "latency.json"
        deployment = LocalDeployment(
            root, nodes=args.nodes, fast=not args.defaults, worker=not args.no_worker, env=env,
            worker_args=["--app", "latency_app:client", "--app-dir", str(APP)])
        t0 = time.perf_counter()
        with deployment:
            started = time.perf_counter() - t0
            res = deployment.run(APP, {"rounds": args.rounds, "nodes": args.nodes,
                                       "out": str(out)})
            if not out.exists():
                sys.exit(f"the run wrote no {out} (flwr run exit {res.returncode}):\n"
                         f"{res.stdout[-3000:]}{res.stderr[-3000:]}\n{deployment.logs()}")
        times = json.loads(out.read_text())["round_s"]
    worker_on = not args.no_worker and enabled("long-lived-worker")
    mode = f"Flower {flower_version()} defaults" if args.defaults else (
        f"Flower {flower_version()}, worker {'on' if worker_on else 'off'}, SuperNode poll "
        f"{env.get('FEDTUNE_SUPERNODE_POLL_S', '0.1')} s, grid poll "
        f"{env.get('FEDTUNE_GRID_POLL_S', '0.1')} s")
    print(f"mode: {mode}; {args.nodes} SuperNodes; deployment started in {started:.1f} s")
    for i, t in enumerate(times, start=1):
        print(f"round {i}: {t:.2f} s")
    later = times[1:]
    print(f"rounds 2..{len(times)}: median {statistics.median(later):.2f} s, "
          f"mean {statistics.mean(later):.2f} s, max {max(later):.2f} s")
    print(f"seconds_per_round={statistics.median(later):.3f}")


if __name__ == "__main__":
    main()

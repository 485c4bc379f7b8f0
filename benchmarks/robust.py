"""Poisoning table: final test accuracy of honest runs and of runs with one attacker, per
aggregation rule, cohort size and privacy setting (issue 27 #3, THREATS.md class 5).

Every cell is a real `fedtune run` through the simulation (tiny: few rounds and steps, short
max_length), each under `flock /tmp/fedtune-e2e.lock` so it never overlaps another
end-to-end run on the machine. The attacker is partition 0 of a cohort that is the whole
population (`num_clients = clients_per_round`), so it attacks every round:
- flip: it sends -k x its honest delta (default k = 10), dragging the model back;
- boost: it sends k x its honest delta (default k = 100), a model-replacement attempt.
Rules: FedAvg (`mean`), FedAvg with the adaptive norm bound (each delta clipped to the
cohort's median norm), the same bound centred on the cohort's median (`centred_bound`: each
delta's distance from the coordinate-wise median clipped to the median distance), the
same adaptive bound with the centre the server picks from its privacy setting
(`auto_bound`: `norm_bound_center = "auto"`, the median under DP-SGD, zero without; with
`norm_bound_direction = "auto"` too, `auto_checked_bound`: the direction check only
without DP-SGD), the
bound around zero with the direction check (`direction_bound`: a bounded row whose cosine
to the coordinate-wise median of the other rows is negative is dropped from the mean, at
most one), the same check against the server's validation descent direction instead
(`validation_bound`; `validation_median`: that check before the median; `_all`: on the
whole validation split; `validation_weighted_all`: every row weighted by max(0, its cosine
to that direction) instead of the capped drop; `validation_median_bound_all`: the adaptive
bound, that check, then the median; `validation_median_majority_all`: the same check
dropping every row below 0 while 3 are left; `validation_median_zero_all`: the rows below 0,
the lowest first and at most 2 of 5, replaced by zero votes, none dropped), coordinate-wise
`median`, and `trimmed_mean` (beta 0.2).

Run folders go under --out; a cell whose summary.json exists is not run again, so an
interrupted table resumes. The table is printed (and written to OUT/table.md) after every
run, with each attacked cell's difference to the honest run of the same rule.

    python benchmarks/robust.py --out /tmp/robust-runs
    python benchmarks/robust.py --out /tmp/robust-runs --cohorts 5 --privacy nodp
    flock /tmp/fedtune-e2e.lock python benchmarks/robust.py --out /tmp/robust-runs --lock-held
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/fedtune-e2e.lock"
RULES = {
    "mean": ["aggregation.rule=mean"],
    "norm_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive"],
    "centred_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                      "aggregation.norm_bound_center=median"],
    # The centre from the server's own privacy setting: the median under DP-SGD, zero without.
    "auto_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                   "aggregation.norm_bound_center=auto"],
    # Both "auto": the centred bound under DP-SGD, the checked bound around zero without.
    "auto_checked_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                           "aggregation.norm_bound_center=auto",
                           "aggregation.norm_bound_direction=auto"],
    "direction_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                        "aggregation.norm_bound_direction=median"],
    # The direction check against the server's own validation descent direction (issue 27,
    # sixth table): after the adaptive bound around zero before the mean, or before the median.
    "validation_bound": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                         "aggregation.norm_bound_direction=validation"],
    "validation_median": ["aggregation.rule=median",
                          "aggregation.norm_bound_direction=validation"],
    # validation_bound with the whole validation split as the reference's rows (capped at
    # the key's maximum): is the reference's own sampling noise what the check misses on?
    "validation_bound_all": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                             "aggregation.norm_bound_direction=validation",
                             "aggregation.direction_reference_rows=4096"],
    "validation_median_all": ["aggregation.rule=median",
                              "aggregation.norm_bound_direction=validation",
                              "aggregation.direction_reference_rows=4096"],
    # Issue 27, eighth table: FLTrust's trust score instead of the capped drop (every row
    # weighted by max(0, cosine to the server's direction), and the bound before the
    # median's check (a kept boosted row is clipped to an honest norm before the median).
    "validation_weighted_all": ["aggregation.rule=mean", "aggregation.norm_bound=adaptive",
                                "aggregation.norm_bound_direction=validation",
                                "aggregation.direction_weighting=cosine",
                                "aggregation.direction_reference_rows=4096"],
    "validation_median_bound_all": ["aggregation.rule=median",
                                    "aggregation.norm_bound=adaptive",
                                    "aggregation.norm_bound_direction=validation",
                                    "aggregation.direction_reference_rows=4096"],
    # Issue 27, ninth table: the bounded median's check may drop every row below 0 as long
    # as 2 x tolerate + 1 rows are left (an honest row scoring below the flipped one then
    # no longer keeps it in the median, unless more honest rows score below it).
    "validation_median_majority_all": ["aggregation.rule=median",
                                       "aggregation.norm_bound=adaptive",
                                       "aggregation.norm_bound_direction=validation",
                                       "aggregation.direction_drop_limit=majority",
                                       "aggregation.direction_reference_rows=4096"],
    # Issue 27, eleventh table: validation_median_bound_all with the centre from the
    # server's privacy setting (the median under DP-SGD, zero without: the same cells as
    # validation_median_bound_all there), so that a flipped row the check keeps is pulled
    # into the honest spread before the median.
    "validation_median_autobound_all": ["aggregation.rule=median",
                                        "aggregation.norm_bound=adaptive",
                                        "aggregation.norm_bound_center=auto",
                                        "aggregation.norm_bound_direction=validation",
                                        "aggregation.direction_reference_rows=4096"],
    # Issue 27, tenth table: the bounded median's check replaces the rows below 0 (the
    # lowest, at most 2 of 5) by zero votes instead of dropping any (strategies.zero_vote):
    # the median runs over all 5 rows.
    "validation_median_zero_all": ["aggregation.rule=median",
                                   "aggregation.norm_bound=adaptive",
                                   "aggregation.norm_bound_direction=validation",
                                   "aggregation.direction_weighting=zero",
                                   "aggregation.direction_reference_rows=4096"],
    "median": ["aggregation.rule=median"],
    "trimmed_mean": ["aggregation.rule=trimmed_mean", "aggregation.trim_beta=0.2"],
}
PRIVACY = {
    "nodp": ["privacy.sample.enabled=false"],
    "dp": ["privacy.sample.enabled=true", "privacy.sample.target_epsilon=8"],
}
# withhold: partition 0 fails every round, the honest run without it (the floor of a rule
# that excludes the attacker every round); run it with --attacks withhold.
ATTACKS = ("honest", "flip", "boost", "withhold")
TINY = ["train.local_steps=3", "train.batch_size=32", "model.max_length=32",
        "tuning.prompt.length=4", "simulation.num_cpus=2"]
# Set by main(): the test rows scored (0 = the whole test split), and whether the DP noise is
# the seeded simulation kind, so that an honest cell and its attacked cells draw the same
# noise and batches and their difference is the attack's, not the noise's (a paired design).
EXTRA: list[str] = []


def overrides(cohort: int, privacy: str, rule: str, attack: str, scale: dict[str, float],
              seed: int = 0) -> list[str]:
    sets = [f"name=robust-{cohort}-{privacy}-{rule}-{attack}-s{seed}",
            f"data.num_clients={cohort}", f"train.clients_per_round={cohort}", *TINY,
            f"seed={seed}", *EXTRA, *PRIVACY[privacy], *RULES[rule]]
    if attack != "honest":
        sets += [f"faults.attack_simulation.kind={attack}",
                 f"faults.attack_simulation.scale={scale[attack]}",
                 "faults.attack_simulation.partitions=[0]"]
    return sets


# Ray kills workers when the machine's memory passes 95 % (its default): on a machine
# shared with other jobs that dropped clients from whole rounds, which is no attack.
ENV = {"HF_HUB_OFFLINE": "1", "RAY_memory_usage_threshold": "0.995"}
TRIES = 3
# --lock-held: the caller holds LOCK for the whole table (`flock LOCK python ... --lock-held`),
# so the cells run back to back instead of each waiting for the lock again.
LOCK_HELD = False


def run_cell(folder: Path, sets: list[str]) -> dict:
    """The run's summary, with `lost_clients`: client replies that failed (crash, timeout,
    a worker killed), which a cell must not have to count; it is re-run up to TRIES times."""
    summary = folder / "summary.json"
    for attempt in range(1, TRIES + 1):
        if not summary.exists():
            _run(folder, sets)
        done = _done(folder)
        if done["lost_clients"] == 0 or attempt == TRIES:
            return done
        print(f"# {folder.name}: {done['lost_clients']} client replies lost; running it "
              "again", flush=True)
        shutil.rmtree(folder)
    raise AssertionError("unreachable")


def _done(folder: Path) -> dict:
    # A withheld reply (kind "withhold", clients.faults.withhold) is the cell, not a loss.
    lost = sum(1 for line in (folder / "rounds.jsonl").read_text().splitlines()
               for f in json.loads(line)["failed"] if "withholds its delta" not in f["reason"])
    return {**json.loads((folder / "summary.json").read_text()), "lost_clients": lost}


def _run(folder: Path, sets: list[str]) -> None:
    lock = [] if LOCK_HELD else ["flock", LOCK]
    cmd = [*lock, sys.executable, "-m", "fedtune.cli", "run", "--out", str(folder)]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise SystemExit(f"{folder.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    print(f"# {folder.name}: {time.perf_counter() - t0:.0f} s (lock wait included)", flush=True)


def table(results: dict[tuple[int, str, str, str, int], dict]) -> str:
    """Final test accuracy (test loss) per cell, and each attacked cell's accuracy
    difference to the honest run of the same rule, cohort, privacy setting and seed; with
    several seeds, the means over the seeds that have both cells, and the range of the
    differences in brackets."""
    attacks = [a for a in ATTACKS[1:] if a != "withhold" or any(k[3] == a for k in results)]
    rows = ["| attackers | privacy | rule | honest acc. (loss) | "
            + " | ".join(f"{a} acc. (loss) | vs honest" for a in attacks) + " |",
            "|---|---|---|---:|" + "---:|---:|" * len(attacks)]
    keys = sorted({k[:3] for k in results}, key=lambda k: (k[0], k[1] != "nodp",
                                                           list(RULES).index(k[2])))
    seeds = sorted({k[4] for k in results})
    for cohort, privacy, rule in keys:
        honest = [results.get((cohort, privacy, rule, "honest", s)) for s in seeds]
        cells = [_acc([h for h in honest if h])]
        for attack in attacks:
            got = [results.get((cohort, privacy, rule, attack, s)) for s in seeds]
            diffs = [100 * (g["final_accuracy"] - h["final_accuracy"])
                     for g, h in zip(got, honest, strict=True) if g and h]
            cells += [_acc([g for g in got if g]), _diff(diffs)]
        rows.append(f"| 1 of {cohort} | {privacy} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _diff(diffs: list[float]) -> str:
    if not diffs:
        return "-"
    mean = f"{sum(diffs) / len(diffs):+.1f} pt"
    return mean if len(diffs) == 1 else f"{mean} ({min(diffs):+.1f} to {max(diffs):+.1f})"


def _acc(summaries: list[dict]) -> str:
    if not summaries:
        return "-"
    n = len(summaries)
    acc = sum(s["final_accuracy"] for s in summaries) / n
    # A diverged run's loss is null (NaN is not JSON): the cell says so, not a mean.
    losses = [s["final_loss"] for s in summaries]
    loss = "diverged" if None in losses else f"{sum(losses) / n:.3g}"
    # A cell that still lost client replies after TRIES runs is marked, not hidden.
    lost = sum(s["lost_clients"] for s in summaries)
    mark = f", {lost} replies lost" if lost else ""
    runs = f", {n} seeds" if n > 1 else ""
    return f"{acc:.4f} ({loss}{runs}{mark})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cohorts", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--privacy", nargs="+", default=list(PRIVACY), choices=list(PRIVACY))
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-max", type=int, default=256,
                    help="test rows scored per cell (0: the whole test split)")
    ap.add_argument("--paired-noise", action="store_true",
                    help="seeded DP noise (privacy.reproducible_noise, a simulation mode): "
                         "each attacked cell draws the noise of its honest cell")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS[:3]), choices=list(ATTACKS),
                    help="the cells to run of each rule and seed (a short queue first)")
    ap.add_argument("--flip-scale", type=float, default=10.0)
    ap.add_argument("--boost-scale", type=float, default=100.0)
    ap.add_argument("--table-only", action="store_true",
                    help="print the table of the cells already run; run nothing")
    ap.add_argument("--lock-held", action="store_true",
                    help=f"the caller holds {LOCK} (flock it around this script)")
    args = ap.parse_args()
    global LOCK_HELD
    LOCK_HELD = args.lock_held
    scale = {"flip": args.flip_scale, "boost": args.boost_scale, "withhold": 1.0}
    EXTRA[:] = [f"train.rounds={args.rounds}", f"train.eval_max_examples={args.eval_max}",
                *(["privacy.reproducible_noise=true"] if args.paired_noise else [])]
    results: dict[tuple[int, str, str, str, int], dict] = {}
    # The 1-of-5 rows without DP first: the acceptance rows, if time runs short.
    for cohort in args.cohorts:
        for privacy in args.privacy:
            for seed in args.seeds:
                for rule in args.rules:
                    for attack in args.attacks:
                        key = (cohort, privacy, rule, attack, seed)
                        folder = args.out / f"{cohort}-{privacy}-{rule}-{attack}-s{seed}"
                        if args.table_only:
                            if (folder / "summary.json").exists():
                                results[key] = _done(folder)
                            continue
                        results[key] = run_cell(folder, overrides(*key[:4], scale, seed))
                        (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()

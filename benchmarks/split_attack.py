"""The split-mode privacy table (experiments/RESULTS.md): what the server recovers from a
client's smashed data, with and without `split.smashed_dp`, next to each run's accuracy.

For every run folder of `fedtune sweep experiments/split_attack.toml`, client 0's round is
replayed through the real split client against a recording body (`fedtune audit split`),
once at the run's cut and once at cut 0, and attacked as the server could: token recovery
(nearest neighbour at cut 0, a ridge map fitted on other clients' text at cut >= 1) and
label recovery (gradient direction against the global tail).

    python benchmarks/split_attack.py runs/split_attack
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedtune.audit.split_attack import audit_run
from fedtune.config import load_config
from fedtune.run.epsilon_marks import folder_marks, render_epsilon


def _row(folder: Path) -> str:
    cfg = load_config(folder / "config.toml")
    summary = json.loads((folder / "summary.json").read_text())
    at_cut = audit_run(folder)
    at_zero = audit_run(folder, ["split.cut_layer=0"]) if cfg.split.cut_layer else at_cut
    smashed = cfg.split.smashed_dp
    target = f"{smashed.target_epsilon:g}" if smashed.enabled else "off (in clear)"
    eps = summary.get("epsilon_sample")
    covers = "deltas + smashed" if smashed.enabled else "deltas only"
    shown = render_epsilon(eps, folder_marks(folder, "sample", eps), off="-")
    return (f"| {folder.name} | {target} | {shown} ({covers}) "
            f"| {at_zero.token_recovery:.1%} | {at_cut.token_recovery:.1%} "
            f"| {at_cut.token_baseline:.1%} | {at_cut.label_recovery:.1%} "
            f"| {at_cut.label_balanced:.1%} | {at_cut.label_baseline:.1%} "
            f"| {summary['final_accuracy']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the sweep's output folder")
    args = parser.parse_args()
    folders = sorted(p.parent for p in args.runs.rglob("summary.json"))
    if not folders:
        raise SystemExit(f"no finished runs under {args.runs}")
    print("| run | smashed DP target epsilon | reported epsilon (covers) | token recovery, "
          "cut 0 | token recovery, cut 1 | most frequent token | label recovery | "
          "mean per-label recall | majority label | final accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for folder in folders:
        print(_row(folder), flush=True)


if __name__ == "__main__":
    main()

"""The split-mode results table (experiments/RESULTS.md) from the run folders of
`fedtune sweep experiments/split.toml`.

Per variant: final test and best validation accuracy, epsilon, the client's FLOPs per
example as a share of federated full fine-tuning, smashed and delta bytes per round, and
total bytes. Two rows are computed, not run: non-split prompt tuning's traffic is its
measured delta bytes (read from its own folder when it ran), and federated full fine-tuning
moves every backbone and classifier weight as float32 both ways for every client of every
round, at the FLOPs share 1 by definition.

    python benchmarks/split_table.py runs/split
"""

from __future__ import annotations

import argparse
import json
import statistics
import tomllib
from pathlib import Path

from fedtune.run.epsilon_marks import folder_marks, render_epsilon


def _load(folder: Path) -> tuple[dict, list[dict], dict]:
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
    config = tomllib.loads((folder / "config.toml").read_text())
    return summary, rounds, config


def _hidden_size(backbone: str) -> int:
    from transformers import AutoConfig

    from fedtune.models.backbone import resolve_backbone_path

    return int(AutoConfig.from_pretrained(resolve_backbone_path(backbone)).hidden_size)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # None: the run had no validation split


def table(root: Path) -> str:
    runs = {f.name: _load(f) for f in sorted(root.iterdir()) if (f / "summary.json").exists()}
    split = [r for r in runs.values() if "total_smashed_bytes_up" in r[0]]
    if not split:
        raise SystemExit(f"no finished split run under {root}")
    full_pe = split[0][1][0]["full_model_flops_per_example"]
    rows = ["| run | cut layer | local-loss share | final test acc. | best val. acc. | epsilon | "
            "client FLOPs / full FT | smashed MB / round (up + down) | delta MB / round "
            "(up + down) | total MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    smashed_per_round = {}
    for name, (summary, rounds, config) in runs.items():
        sp = config.get("split", {})
        examples = sum(c["examples_seen"] for r in rounds for c in r["per_client"])
        fraction = summary["total_client_flops"] / examples / full_pe
        delta = statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in rounds)
        if sp.get("enabled"):
            smashed = statistics.fmean(r["smashed_bytes_up"] + r["smashed_bytes_down"]
                                       for r in rounds)
            smashed_per_round[name] = smashed
            total = summary["total_bytes"]
            cut, share = str(sp["cut_layer"]), f"{sp['local_loss_fraction']:g}"
        else:
            smashed, total = 0.0, summary["total_bytes_up"] + summary["total_bytes_down"]
            cut, share = "no split", "-"
        eps = summary["epsilon_sample"]
        eps_text = render_epsilon(eps, folder_marks(root / name, "sample", eps), off="-")
        rows.append(f"| {name} | {cut} | {share} | {summary['final_accuracy']:.4f} | "
                    f"{_acc(summary['best_val_accuracy'])} | {eps_text} | "
                    f"{fraction:.4%} | {_mb(smashed)} | {_mb(delta)} | {_mb(total)} |")
    summary, rounds, config = split[0]
    n_rounds = len(rounds)
    clients = statistics.fmean(r["clients"] for r in rounds)
    prompt_values = config["tuning"]["prompt"]["length"] * _hidden_size(config["model"]["backbone"])
    # Every backbone weight + the classifier, float32.
    full_vector = 4 * (summary["backbone_params"] + summary["trainable_params"] - prompt_values)
    full_round = 2 * clients * full_vector
    rows.append(f"| full fine-tuning (computed) | no split | - | not run | not run | - | "
                f"100% | 0.0 | {_mb(full_round)} | {_mb(full_round * n_rounds)} |")
    notes = [f"full fine-tuning FLOPs per example: {full_pe:.4g}; "
             f"full vector: {full_vector:,} bytes"]
    for name, smashed in smashed_per_round.items():
        base = name.removesuffix("-local")
        if name.endswith("-local") and base in smashed_per_round:
            cut = 1 - smashed / smashed_per_round[base]
            acc = runs[name][0]["final_accuracy"] - runs[base][0]["final_accuracy"]
            notes.append(f"{name} vs {base}: smashed bytes per round -{cut:.1%}, "
                         f"final accuracy {acc:+.4f}")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the sweep's output folder")
    print(table(parser.parse_args().root))


if __name__ == "__main__":
    main()

"""Communication vs accuracy of each tuning method on the quickstart setup.

For every method, runs `fedtune run experiments/quickstart.toml --set tuning.method=M`
twice (DP-SGD off, and at epsilon 8) and reads the run folders. Prints, per method:
trainable params, upload bytes per client-round (measured on the Messages, from
rounds.jsonl), the ratio to full-model FedAvg of the same backbone (every backbone + head
weight as float32), and final accuracy without DP and at epsilon 8.

    python benchmarks/communication.py [--methods prompt lora slash bitfit] [--out DIR]
        [--set key=value ...] [--markdown benchmarks/RESULTS.md]

Finished runs (summary.json present) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedtune.run.epsilon_marks import folder_marks, render_epsilon

ROOT = Path(__file__).resolve().parents[1]
DP_SETTINGS = {"no DP": ["privacy.sample.enabled=false"],
               "eps 8": ["privacy.sample.target_epsilon=8"]}


def run(method: str, dp: str, out: Path, extra: list[str]) -> dict:
    folder = out / f"{method}-{dp.replace(' ', '')}"
    if not (folder / "summary.json").exists():
        args = [sys.executable, "-m", "fedtune.cli", "run",
                str(ROOT / "experiments/quickstart.toml"), "--out", str(folder),
                "--set", f"tuning.method={method}"]
        for item in DP_SETTINGS[dp] + extra:
            args += ["--set", item]
        print(f"running {method} ({dp}) -> {folder}", flush=True)
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    per_client = [c["bytes_up"] for r in rounds for c in r["per_client"]]
    eps = summary.get("epsilon_sample")
    return {"summary": summary, "bytes_up_per_client_round": max(per_client),
            "uniform": len(set(per_client)) == 1,
            "eps_shown": render_epsilon(eps, folder_marks(folder, "sample", eps), off="-")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prompt", "lora", "slash", "bitfit"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-communication")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        res = {dp: run(method, dp, args.out, args.extra) for dp in DP_SETTINGS}
        s = res["no DP"]["summary"]
        full = (s["backbone_params"] + head_params()) * 4
        up = res["no DP"]["bytes_up_per_client_round"]
        rows.append({
            "method": method, "trainable_params": s["trainable_params"],
            "bytes_up_per_client_round": up, "ratio_to_full_fedavg": up / full,
            "acc_no_dp": s["final_accuracy"],
            "acc_eps8": res["eps 8"]["summary"]["final_accuracy"],
            "eps_reported": res["eps 8"]["summary"]["epsilon_sample"],
            "eps_shown": res["eps 8"]["eps_shown"],
        })
    table = _markdown(rows, args.out)
    print(table)
    if args.markdown:
        write_section(args.markdown, "communication", table)
    for r in rows:
        print(f"ratio_{r['method']}={r['ratio_to_full_fedavg']:.6f}")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path`
    (appending the block if absent), leaving the prose around it alone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def head_params() -> int:
    """Full-model FedAvg sends every backbone weight plus the same classification head."""
    from fedtune.config import load_config
    from fedtune.task.task import get_task

    model = get_task(load_config(ROOT / "experiments/quickstart.toml")).new_model()
    return sum(p.numel() for p in model.head.parameters())


def _markdown(rows: list[dict], out: Path) -> str:
    lines = [
        "| method | trainable params | upload B / client-round | vs full FedAvg | "
        "final acc, no DP | final acc, eps 8 (reported eps) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | "
            f"{r['bytes_up_per_client_round']:,} | "
            f"{r['ratio_to_full_fedavg']:.5f} | {r['acc_no_dp']:.4f} | "
            f"{r['acc_eps8']:.4f} ({r['eps_shown']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Split-mode fields of the ledger: smashed-data traffic, server FLOPs and the client's
FLOPs per example as a share of full fine-tuning, summed from what clients report, and
`split_privacy`: what the server saw in clear and what `epsilon_sample` covers, stated
from the server's own config (never from what clients claim).

A non-split run gets no extra fields, so non-split ledgers are unchanged.

Under user-level DP the cohort is secret (`fedtune.run.curator_log`): every figure that
counts or sums over it (`COHORT_FIGURES`, all but the config's statement) is the curator's,
and the release keeps each key with null, in every round of a split run, so neither a value
nor a key's presence tells the cohort apart. The summary's totals are then null too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedtune.split.disclosure import in_clear_disclosure
from fedtune.split.figures import COHORT_FIGURES, NULL_TOTALS_NOTE, RELEASE_SAFE
from fedtune.wire.protocol import TrainReport

# The figures' names live apart so that config-time code reads them without torch.
__all__ = ["COHORT_FIGURES", "NULL_TOTALS_NOTE", "RELEASE_SAFE", "split_round_fields",
           "split_summary_fields"]


def split_round_fields(reports: Sequence[TrainReport], bytes_up: int, bytes_down: int,
                       statement: dict[str, Any] | None = None) -> dict[str, Any]:
    """Round totals over every client that trained (accepted or rejected: a rejected delta
    still cost its traffic), from their typed reports. `bytes_up`/`bytes_down` are the
    round's delta bytes. `statement`: what the server saw in clear, from the run's config
    (`fedtune.split.disclosure.split_disclosure`, empty for a non-split run); every split
    round states it. Without one, a round with split traffic states the worst case
    (smashed data in clear)."""
    split = [(r, f) for r in reports if (f := r.split) is not None]
    privacy = _privacy(statement, bool(split))
    if not split:
        return privacy
    examples = sum(int(r.examples_seen or 0) for r, _ in split)
    # Per trained example: pruning's scoring pass (in `flops` too) is not a training step.
    client_flops = sum(float(r.flops or 0.0) - _scoring_flops(r) for r, _ in split)
    per_example = client_flops / max(1, examples)
    # A property of the model, reported by every split client alike: the median, so that
    # no one client sets the round's denominator.
    full = float(np.median([f.full_model_flops_per_example for _, f in split]))
    up = sum(int(f.smashed_bytes_up) for _, f in split)
    down = sum(int(f.smashed_bytes_down) for _, f in split)
    # The FLOP probe (synthetic text, once per worker process) crossed the wire too.
    probe = sum(int(f.probe_bytes) for _, f in split)
    return {
        "smashed_bytes_up": up,
        "smashed_bytes_down": down,
        "probe_bytes": probe,
        "delta_bytes_up": bytes_up,
        "delta_bytes_down": bytes_down,
        "total_bytes": up + down + probe + bytes_up + bytes_down,
        "server_flops": sum(float(f.server_flops) for _, f in split),
        "client_flops_per_example": per_example,
        "full_model_flops_per_example": full,
        "client_flops_fraction": per_example / full,
        "split_steps": sum(int(f.split_steps) for _, f in split),
        "local_loss_steps": sum(int(f.local_loss_steps) for _, f in split),
        **privacy,
    }


def _scoring_flops(report: TrainReport) -> float:
    pruning = report.pruning
    return 0.0 if pruning is None else float(pruning.scoring_flops)


def _privacy(statement: dict[str, Any] | None, split_traffic: bool) -> dict[str, Any]:
    if statement is not None:
        return {"split_privacy": statement} if statement else {}
    return {"split_privacy": in_clear_disclosure()} if split_traffic else {}


def split_summary_fields(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Run totals, and the last round's privacy statement (a config does not change
    mid-run: resume refuses an edited one). `history` is the release: where any round holds
    null for a figure (user-level DP), every total is null, with `split_totals_note`."""
    statement = next((r["split_privacy"] for r in reversed(history) if "split_privacy" in r),
                     None)
    privacy = {} if statement is None else {"split_privacy": statement}
    rounds = [r for r in history if "smashed_bytes_up" in r]
    if not rounds:
        return privacy
    if any(r.get(key, 0) is None for r in rounds for key in COHORT_FIGURES):
        return {**dict.fromkeys(SUMMARY_TOTALS), "split_totals_note": NULL_TOTALS_NOTE,
                **privacy}
    up = sum(r["smashed_bytes_up"] for r in rounds)
    down = sum(r["smashed_bytes_down"] for r in rounds)
    return {
        "total_smashed_bytes_up": up,
        "total_smashed_bytes_down": down,
        "total_probe_bytes": sum(r.get("probe_bytes", 0) for r in rounds),
        "total_bytes": up + down + sum(r["delta_bytes_up"] + r["delta_bytes_down"]
                                       + r.get("probe_bytes", 0) for r in rounds),
        "total_server_flops": sum(r["server_flops"] for r in rounds),
        "client_flops_fraction": rounds[-1]["client_flops_fraction"],
        **privacy,
    }


SUMMARY_TOTALS = ("total_smashed_bytes_up", "total_smashed_bytes_down", "total_probe_bytes",
                  "total_bytes", "total_server_flops", "client_flops_fraction")

"""Split-mode fields of the ledger: smashed-data traffic, server FLOPs and the client's
FLOPs per example as a share of full fine-tuning, summed from what clients report, and
`split_privacy`: what the server saw in clear and what `epsilon_sample` covers, stated
from the server's own config (never from what clients claim).

A non-split run gets no extra fields, so non-split ledgers are unchanged.
"""

from __future__ import annotations

from typing import Any

from fedtune.split.disclosure import in_clear_disclosure


def split_round_fields(reports: list[dict[str, Any]], bytes_up: int, bytes_down: int,
                       statement: dict[str, Any] | None = None) -> dict[str, Any]:
    """Round totals over every client that trained (accepted or rejected: a rejected delta
    still cost its traffic). `bytes_up`/`bytes_down` are the round's delta bytes.
    `statement`: what the server saw in clear, from the run's config
    (`fedtune.split.disclosure.split_disclosure`, empty for a non-split run); every split
    round states it. Without one, a round with split traffic states the worst case
    (smashed data in clear)."""
    split = [c for c in reports if "smashed_bytes_up" in c]
    privacy = _privacy(statement, bool(split))
    if not split:
        return privacy
    examples = sum(int(c["examples_seen"]) for c in split)
    # Per trained example: pruning's scoring pass (in `flops` too) is not a training step.
    client_flops = sum(float(c["flops"]) - float(c.get("scoring_flops", 0.0)) for c in split)
    per_example = client_flops / max(1, examples)
    full = float(split[0]["full_model_flops_per_example"])
    up = sum(int(c["smashed_bytes_up"]) for c in split)
    down = sum(int(c["smashed_bytes_down"]) for c in split)
    # The FLOP probe (synthetic text, once per worker process) crossed the wire too.
    probe = sum(int(c.get("probe_bytes", 0)) for c in split)
    return {
        "smashed_bytes_up": up,
        "smashed_bytes_down": down,
        "probe_bytes": probe,
        "delta_bytes_up": bytes_up,
        "delta_bytes_down": bytes_down,
        "total_bytes": up + down + probe + bytes_up + bytes_down,
        "server_flops": sum(float(c["server_flops"]) for c in split),
        "client_flops_per_example": per_example,
        "full_model_flops_per_example": full,
        "client_flops_fraction": per_example / full,
        "split_steps": sum(int(c["split_steps"]) for c in split),
        "local_loss_steps": sum(int(c["local_loss_steps"]) for c in split),
        **privacy,
    }


def _privacy(statement: dict[str, Any] | None, split_traffic: bool) -> dict[str, Any]:
    if statement is not None:
        return {"split_privacy": statement} if statement else {}
    return {"split_privacy": in_clear_disclosure()} if split_traffic else {}


def split_summary_fields(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Run totals, and the last round's privacy statement (a config does not change
    mid-run: resume refuses an edited one)."""
    statement = next((r["split_privacy"] for r in reversed(history) if "split_privacy" in r),
                     None)
    privacy = {} if statement is None else {"split_privacy": statement}
    rounds = [r for r in history if "smashed_bytes_up" in r]
    if not rounds:
        return privacy
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

"""The run folder's records: one JSON line per round, and the summary.

Each round line is flushed and fsynced as soon as the round ends, so a crash or kill keeps
every round completed so far; the summary is written atomically.

No file is written through a symlink (THREATS.md 7): both go through `fedtune.run.atomic`,
the one writer (`append_line` for a round, `write_json_atomic` for the summary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.run.atomic import append_line, write_json_atomic, write_text_atomic
from fedtune.run.folder import CONFIG_FILE as CONFIG_FILE  # re-exported for older imports
from fedtune.run.folder import ROUNDS_FILE, SUMMARY_FILE


class LedgerError(ValueError):
    """rounds.jsonl cannot be continued."""


class NoContributionError(RuntimeError):
    """No client contributed to the model in any round of the run: nothing was learned
    (the ledger is written; no summary is)."""


class Ledger:
    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.dir / ROUNDS_FILE

    def append_round(self, record: dict[str, Any]) -> None:
        append_line(self.rounds_path, json.dumps(record, sort_keys=False))

    def rounds(self) -> list[dict[str, Any]]:
        return read_rounds(self.dir)

    def restore(self, completed_round: int, last_record: dict[str, Any]) -> None:
        """Make the ledger hold exactly rounds 1..`completed_round` after a kill: a line cut
        off mid-write is dropped, and the last round (checkpointed before it was appended)
        is appended if it is missing. Anything else means the folder was tampered with."""
        lines = self.rounds_path.read_text().splitlines() if self.rounds_path.exists() else []
        records = []
        for num, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if num != len(lines):
                    raise LedgerError(f"{self.rounds_path}:{num} is not JSON") from None
        rounds = [r.get("round") for r in records]
        if completed_round and rounds == list(range(1, completed_round)):
            records.append(last_record)  # (round 0, the start-of-run checkpoint: no record)
        elif rounds != list(range(1, completed_round + 1)):
            raise LedgerError(
                f"{self.rounds_path} holds rounds {rounds}, but the checkpoint is at round "
                f"{completed_round}: the ledger does not match the checkpoint")
        if not records and not lines:
            return  # round 0 (the checkpoint written before round 1): nothing to restore
        if len(records) != len(lines) or records[-1] is last_record:
            write_text_atomic(self.rounds_path, "".join(json.dumps(r) + "\n" for r in records))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.dir / SUMMARY_FILE, summary)


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every round record of a run folder; a LedgerError naming the file and line for one
    that is not a JSON object (a last line cut off mid-write is told apart)."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for num, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if num == len(lines) and not text.endswith("\n"):
                raise LedgerError(
                    f"{path}:{num} is cut off mid-write (the run was killed while writing "
                    f"it); the {len(records)} round record(s) before it are complete"
                ) from None
            raise LedgerError(f"{path}:{num} is not JSON") from None
        if not isinstance(record, dict) or "round" not in record:
            raise LedgerError(f"{path}:{num} is not a round record (a JSON object with a "
                              "round)")
        records.append(record)
    return records


def count_rounds(run_dir: str | Path) -> int:
    """Rounds a live run has completed: its complete lines (a line being written counts
    once it ends), never an error; for progress displays only."""
    path = Path(run_dir) / ROUNDS_FILE
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0

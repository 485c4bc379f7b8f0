"""The run folder's records: one JSON line per round, and the summary.

Each round line is flushed and fsynced as soon as the round ends, so a crash or kill keeps
every round completed so far; the summary is written atomically.

No file is written through a symlink (THREATS.md 7: links planted in `--out` were followed
and a run wrote `config.toml` and `rounds.jsonl` through them): `rounds.jsonl` is opened with
O_NOFOLLOW, and whole files are written to a new temp file (O_EXCL | O_NOFOLLOW), fsynced and
renamed over the name, which replaces a link instead of following it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"


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
        fd = os.open(self.rounds_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

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


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a fresh temp file next to it (never through a link, never
    an existing file), fsynced, then renamed over `path` (a link there is replaced, its
    target untouched)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()  # a stale temp file of a killed write, or a planted link: the entry goes
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

"""The run folder's records: one JSON line per round, and the summary.

Each round line is flushed and fsynced as soon as the round ends, so a crash or kill keeps
every round completed so far; the summary is written atomically.

No file is written through a symlink (THREATS.md 7: links planted in `--out` were followed
and a run wrote `config.toml` and `rounds.jsonl` through them): `rounds.jsonl` is opened with
O_NOFOLLOW (`open_append`), and whole files are written to a new temp file (O_EXCL |
O_NOFOLLOW), fsynced and renamed over the name, which replaces a link instead of following it
(`write_atomic`: the one whole-file writer of run, export and sweep folders and checkpoints).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

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
        with open_append(self.rounds_path) as fh:
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
    """Replace `path` with `text` (`write_atomic`)."""
    write_atomic(path, text.encode("utf-8"))


def write_atomic(path: Path, content: bytes | Callable[[str], None]) -> None:
    """The one way a file in a run, export or sweep folder is written whole: `content` (or
    what `content(temp_path)` writes) goes to a fresh temp file next to `path` (a new name,
    O_EXCL | O_NOFOLLOW: never through a link, never an existing file), is fsynced and
    renamed over `path` (a link there is replaced, its target untouched), and the folder is
    fsynced so the rename survives a power cut. A kill leaves the old file or the new."""
    path = Path(path)
    fd, tmp = _fresh_temp(path)
    try:
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            content(str(tmp))  # a library writer (safetensors) given the fresh name
            fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _fresh_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
                           | os.O_CLOEXEC, 0o644), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temp file name for {path.name}")


def fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_append(path: Path) -> TextIO:
    """`path` opened to append text, created if missing, never through a link (O_NOFOLLOW:
    a link planted under its name is an OSError, its target untouched)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def write_folder_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Make the folder `path` from what `fill(temp_folder)` writes into a fresh temp folder
    next to it (a new name: nothing planted in it), then renamed into place. What was at
    `path` (an older folder, or a link planted there) is moved aside first and removed, its
    contents and any link target untouched: a library that writes by name (peft's
    save_pretrained) never writes through a link."""
    path = Path(path)
    tmp = _fresh_folder(path, "tmp")
    try:
        fill(tmp)
        old = None
        if os.path.lexists(path):
            old = _fresh_folder(path, "old")
            os.rename(path, old / "entry")  # the entry itself moves, never what it links to
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)  # rmtree removes links, never follows them
    fsync_folder(path.parent)


def _fresh_folder(path: Path, what: str) -> Path:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{what}-{secrets.token_hex(6)}")
        try:
            os.mkdir(tmp)  # O_EXCL semantics: a planted name fails instead of being reused
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temp folder name for {path.name}")

"""Claim a run folder (`--out`) before anything expensive starts.

A run owns its folder through an exclusive lock (`flock` on `.fedtune.lock` inside it), held
for the whole run by the process that claimed it: a second run on the same folder fails at
once instead of interleaving two ledgers. The kernel drops the lock when that process ends,
however it ends (Ctrl-C, SIGTERM, kill -9), so a stale lock file never blocks a resume.

A new run never writes into a folder that already holds a run's files (not even
`config.toml`): whatever is there belongs to another run and stays as it is. A resume needs
the folder it continues. Problems (a file where the folder should be, no write access, a
folder in use) are found here, before Ray or any model starts.

A symlink as `--out` or anywhere inside it (a bounded walk of the whole tree: peft writes
into `adapter/` by name) is refused (new run and resume), dangling or not: a run wrote
`config.toml` and `rounds.jsonl` through planted links. The files themselves are
opened without following links (`fedtune.run.ledger`), which also covers a link planted later.
A hard link is no symlink: one planted under any run file's name makes a new run refuse the
folder (RUN_FILES), and what is written in place (the logs, the lock file) is refused unless
it is a regular file with no other link (`fedtune.run.atomic.refuse_shared_or_special`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from fedtune.run.atomic import refuse_shared_or_special

# Every file name of a run folder (and of an export and a sweep folder), named once here;
# this module imports no torch, so the claim and the CLI read them instantly.
CONFIG_FILE = "config.toml"  # the experiment config the run ran under
ROUNDS_FILE = "rounds.jsonl"  # one ledger line per round (fedtune.run.ledger)
SUMMARY_FILE = "summary.json"  # written once, when the run ends
CHECKPOINT_FILE = "checkpoint.safetensors"  # the server state after a round (.checkpoint)
PENDING_FILE = "privacy_pending.json"  # the DP charges of the round sent last (.checkpoint)
CURATOR_FILE = "curator_log.jsonl"  # the curator's log of cohort figures (.curator_log)
STATE_FILE = "final_state.safetensors"  # the final trainable tensors (.export)
ADAPTER_DIR = "adapter"  # peft's save_pretrained of a peft-based method (.export)
MANIFEST_FILE = "fedtune.json"  # an export folder's manifest (.export)
LOCK_FILE = ".fedtune.lock"  # the claim's flock
SWEEP_LOG = "sweep.log"  # a sweep variant's output (fedtune.study.sweep)
RUN_LOG = "run.log"  # dependencies' warnings and logs without --verbose (.runtime.quiet)
SWEEP_RESULTS = "sweep.json"  # a sweep folder's table (fedtune sweep)
REPORT_FILE = "report.md"  # a report folder's page (fedtune.study.report)
# What a run writes into its folder: any of them marks the folder as taken, so a new run
# never writes into a file planted under one of these names (a hard link to a file outside
# it, which no link check sees). PENDING_FILE is left out on purpose: a sweep carries a dead
# attempt's charges into the new run's folder before that run starts (fedtune.study.sweep);
# it is only ever replaced whole (a planted file's other names stay untouched).
RUN_FILES = (CONFIG_FILE, ROUNDS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, CURATOR_FILE, STATE_FILE,
             ADAPTER_DIR)


class RunFolderError(ValueError):
    """`--out` cannot hold this run (named in the message)."""


class RunFolder:
    """An exclusively locked run folder; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_folder(path: Path, resume: bool = False, flag: str = "--out") -> RunFolder:
    """Lock `path` for one run. A new run needs a folder without run files (created if
    missing); `resume` needs an existing one. Raises RunFolderError naming the problem."""
    if path.is_symlink():
        raise RunFolderError(f"{flag} {path} is a symlink; give the real folder")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {path} is a file, not a folder")
    if resume and not path.is_dir():
        raise RunFolderError(f"{flag} {path} does not exist: nothing to resume")
    if path.is_dir():
        refuse_links(path, flag)
    if not resume:
        _refuse_taken(path, flag)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{flag} {path} cannot be created: "
                                 f"{exc.strerror or exc}") from None
    folder = RunFolder(path, _lock(path, flag))
    try:
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunFolderError(f"{flag} {path} is not writable")
        if not resume:
            _refuse_taken(path, flag)  # another run may have written it before we locked
        refuse_links(path, flag)
    except BaseException:
        folder.release()
        raise
    return folder


# Entries the link check walks at most: a run folder holds tens (an adapter a few); a tree
# past this is not a run's, and walking it without end would be a denial of service.
MAX_TREE_ENTRIES = 10_000


def find_links(path: Path, what: str = "folder") -> list[str]:
    """Every symlink anywhere under `path` (relative names), found without following any
    link (a linked folder is reported, never entered). Raises RunFolderError past
    MAX_TREE_ENTRIES entries."""
    links: list[str] = []
    stack, seen = [Path(path)], 0
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_TREE_ENTRIES:
                    raise RunFolderError(f"{what} {path} holds more than {MAX_TREE_ENTRIES} "
                                         "entries: not a run folder, choose another")
                if entry.is_symlink():
                    links.append(os.path.relpath(entry.path, path))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return sorted(links)


def refuse_links(path: Path, flag: str) -> None:
    """A RunFolderError naming the links planted anywhere under `path` (a run, an export
    and a sweep never write through one; peft writes into `adapter/` by name)."""
    links = find_links(path, flag)
    if links:
        shown = ", ".join(repr(name[:80]) for name in links[:5])
        more = ", ..." if len(links) > 5 else ""
        raise RunFolderError(f"{flag} {path} holds symlinks ({shown}{more}); a run never "
                             f"writes through a link: remove them or choose another {flag}")



def _refuse_taken(path: Path, flag: str) -> None:
    if not path.is_dir():
        return
    # lexists: a dangling link planted under a run file's name counts too.
    taken = [name for name in RUN_FILES if os.path.lexists(path / name)]
    if not taken:
        return
    hint = (f"--resume {path} continues it" if (path / CHECKPOINT_FILE).exists()
            and not (path / SUMMARY_FILE).exists() else "remove it first")
    raise RunFolderError(f"{flag} {path} already holds a run ({', '.join(taken)}); a new run "
                         f"never writes into it: choose another {flag}, or {hint}")


def _lock(path: Path, flag: str) -> int:
    lock_path = path / LOCK_FILE
    try:
        # O_NOFOLLOW: a symlink planted as the lock file is refused, never followed.
        # O_NONBLOCK: a FIFO planted as the lock file never makes the open wait.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise RunFolderError(f"{flag} {path} is not writable") from None
        raise RunFolderError(f"{flag} {path}: cannot create {LOCK_FILE}: "
                             f"{exc.strerror or exc}") from None
    try:  # truncated and written below: never a FIFO or a file hard-linked from elsewhere
        refuse_shared_or_special(fd, lock_path)
    except OSError as exc:
        os.close(fd)
        raise RunFolderError(f"{flag} {path}: {LOCK_FILE} {exc.strerror}; remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise RunFolderError(f"{flag} {path} is in use by another fedtune run{who}; wait for "
                             "it to end or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

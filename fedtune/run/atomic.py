"""The one way fedtune writes a file: whole and durably, never through a link.

A whole file goes to a fresh temp file next to its name (a new name, O_EXCL | O_NOFOLLOW:
never through a link, never an existing file), is fsynced and renamed over the name (a link
planted there is replaced, its target untouched), and the folder is fsynced so the rename
survives a power cut: a kill leaves the old file or the new, never half of one. A library's
output reaches it as bytes or through the file object it opened, never by the temp name. A
log line is appended with O_NOFOLLOW, only into a regular file with no other hard link, and
fsynced before the call returns.

Why: THREATS.md 7 (links planted in `--out` were followed and a run wrote `config.toml` and
`rounds.jsonl` through them) and issue 28 (five writers, one of them fsynced). Every file a
run, export or sweep writes, checkpoints, and the caches (token arrays, task bundles, the
prefix cache's index) go through here.

This module imports only the standard library, so every layer may use it (it sits in the
lowest layer of tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafeFileError(OSError):
    """A file fedtune would write in place is not its own regular file (named in the
    message: `[Errno n] why: 'path'`)."""


def write_atomic(path: str | Path, content: bytes) -> None:
    """Replace `path` with `content`. A library's output is serialized to bytes first
    (safetensors' `save`, a file's bytes): no writer is ever handed a temp file's NAME,
    which anyone with write access to the folder could swap for a link between our
    O_EXCL create and the library's own open (ATTACK28)."""
    if not isinstance(content, bytes | bytearray | memoryview):
        raise TypeError(f"write_atomic({path}): content must be bytes, not "
                        f"{type(content).__name__} (serialize first; use write_stream_atomic "
                        "for a writer that takes a file object)")
    write_stream_atomic(path, lambda fh: fh.write(content))


def write_stream_atomic(path: str | Path, fill: Callable[[BinaryIO], Any]) -> None:
    """Replace `path` with what `fill(binary_file)` writes (e.g. `np.save(fh, array)`)."""
    path = Path(path)
    fd, tmp = _fresh_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8)."""
    write_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Replace `path` with `data` as indented JSON and a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def open_append(path: str | Path, mode: int = 0o644) -> TextIO:
    """`path` opened to append text, created (with `mode`) if missing, never through a link
    (O_NOFOLLOW: a link planted under its name is an OSError, its target untouched), and
    only into a regular file of its own: a FIFO (O_NONBLOCK: the open never waits for a
    reader) or a file with another hard link (its other name may be anyone's, outside the
    folder) is refused with an OSError naming it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW
                 | os.O_CLOEXEC, mode)
    try:
        refuse_shared_or_special(fd, path)
        # Back to blocking writes: O_NONBLOCK was there for the open only.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def refuse_shared_or_special(fd: int, path: str | Path) -> None:
    """An OSError naming `path` unless the open `fd` is a regular file with one link: what
    is written in place (an appended log, the claim's lock file) must land in the run
    folder only, never in a FIFO, a device, or a file hard-linked from elsewhere."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(errno.EINVAL, "not a regular file (a FIFO, device or socket "
                              "planted under a run file's name); refusing to write it", str(path))
    if st.st_nlink > 1:
        raise UnsafeFileError(errno.EMLINK, f"has {st.st_nlink} hard links (another name may "
                              "be outside the folder); refusing to write it", str(path))


def append_line(path: str | Path, line: str, mode: int = 0o644) -> None:
    """Append `line` and a newline to `path` (`open_append`), on disk when this returns:
    a crash or kill keeps every line appended so far."""
    with open_append(path, mode) as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_folder_atomic(path: str | Path, fill: Callable[[Path], None],
                        mode: int | None = None) -> None:
    """Make the folder `path` from what `fill(temp_folder)` writes into a fresh temp folder
    next to it (a new name, made private: 0700 while it fills, so no other user plants a
    file or link in it), then given `mode` (default: what a plain mkdir gives under the
    umask) and renamed into place. What was at `path` (an older folder, or a link planted
    there) is moved aside first and removed, its contents and any link target untouched: a
    library that writes by name (peft's save_pretrained) never writes through a link."""
    path = Path(path)
    tmp = _fresh_folder(path, "tmp")
    try:
        fill(tmp)
        os.chmod(tmp, _mkdir_mode() if mode is None else mode, follow_symlinks=False)
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


def is_real_folder(path: str | Path) -> bool:
    """True when `path` is a folder itself, not a link to one (lstat: never followed)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def make_real_folder(path: str | Path, what: str) -> Path:
    """`path` made (with its parents) when missing and checked to be a folder of its own,
    for a cache that writes `what` into it: an OSError naming it when it is a link (a
    cache is never written through one) or not a folder."""
    path = Path(path)
    if not os.path.islink(path):
        path.mkdir(parents=True, exist_ok=True)
    if not is_real_folder(path):
        raise UnsafeFileError(errno.ELOOP, f"is a link or not a folder: {what} are not "
                              "written through it (make it a real folder, or point "
                              "$FEDTUNE_CACHE_DIR at the folder it links to)", str(path))
    return path


def make_own_folder(path: str | Path, what: str) -> Path:
    """`make_real_folder`, made (when missing) not writable by group or others, and checked
    to be this user's own and not writable by group or others: a cache that READS `what`
    from it trusts no file another local user could have planted or replaced there (an
    UnsafeFileError naming it and the fix otherwise). Whoever runs as this user can edit
    fedtune itself, so no check defends against them; this one is about the others."""
    path = Path(path)
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)  # umask 002 would leave it open to the group
    make_real_folder(path, what)
    if why := not_own(os.lstat(path)):
        raise UnsafeFileError(errno.EACCES, f"is {why}: {what} are read only from a folder "
                              "no other user can write (chmod go-w it, or point "
                              "$FEDTUNE_CACHE_DIR at a folder of your own)", str(path))
    return path


def not_own(info: os.stat_result) -> str | None:
    """Why a file or folder with this (l)stat is not this user's alone to write, or None:
    owned by another user, or writable by its group or by others."""
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not this user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fresh_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
                           | os.O_CLOEXEC, 0o644), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temp file name for {path.name}")


def _fresh_folder(path: Path, what: str) -> Path:
    """A new folder next to `path`, private (0700, as tempfile.mkdtemp makes): what a
    library writes into it by name cannot meet a file or link another user planted."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{what}-{secrets.token_hex(6)}")
        try:
            os.mkdir(tmp, 0o700)  # O_EXCL semantics: a planted name fails instead of being reused
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temp folder name for {path.name}")


def _mkdir_mode() -> int:
    """The mode a plain mkdir gives a folder (0777 less the umask), read without changing
    the umask where Linux shows it (os.umask sets it: another thread's file made meanwhile
    would get the temporary one; the fallback makes it stricter, never looser)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o777 & ~umask

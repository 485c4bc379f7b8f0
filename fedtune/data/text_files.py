"""Bring-your-own data files, checked before `datasets` reads them.

`datasets` reports an empty, truncated or wrongly encoded file as a generation error many
frames deep, some (an empty JSON Lines file) as a bare StopIteration, and a JSON file that
is not UTF-8 loads and only fails when a row is read. Each file is checked here first, so
the error names the file and what is wrong with it.
"""

from __future__ import annotations

import codecs
import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Text formats whose bytes must be UTF-8; parquet, arrow and compressed files are binary.
TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A local data file is empty or not UTF-8 text; the message names the file."""


def local_data_files(data_files: Any, base: Path | None = None) -> list[Path]:
    """The local files `data_files` (a path, a glob, a list or a split -> paths table, as
    `datasets.load_dataset` takes it) names; names that match no local file are left to
    `datasets` (it reports missing files itself, and may resolve remote ones)."""
    found: list[Path] = []
    for name in data_file_names(data_files):
        pattern = Path(name).expanduser()
        if base is not None and not pattern.is_absolute():
            pattern = base / pattern
        if glob.has_magic(str(pattern)):
            found += [Path(p) for p in sorted(glob.glob(str(pattern), recursive=True))]
        elif pattern.is_file():
            found.append(pattern)
    return [f for f in dict.fromkeys(found) if f.is_file()]


def data_file_names(data_files: Any) -> Iterator[str]:
    """Each name (path or glob) in `data_files`, as `datasets.load_dataset` takes it."""
    if isinstance(data_files, (str, Path)):
        yield str(data_files)
    elif isinstance(data_files, list):
        for item in data_files:
            yield from data_file_names(item)
    elif isinstance(data_files, dict):
        for item in data_files.values():
            yield from data_file_names(item)


def check_text_file(path: Path) -> None:
    """Refuse a file with no content, or (for a text format) bytes that are not UTF-8."""
    if path.suffix.lower() not in TEXT_SUFFIXES:
        if path.stat().st_size == 0:
            raise DataFileError(f"data file {path} is empty")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, content = 0, False
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    f"data file {path} is not UTF-8 text (byte {offset - pending + exc.start}: "
                    f"{exc.reason}); re-save it as UTF-8") from None
            content = content or bool(text.strip())
            if not chunk:
                break
            offset += len(chunk)
    if not content:
        raise DataFileError(f"data file {path} is empty")


def local_files_by_split(data_files: Any, base: Path | None = None
                         ) -> dict[str, list[Path]] | None:
    """`data_files` as split -> its local files, in the order `datasets` reads them when
    given this table (a path, glob or list is the "train" split); None when a name matches
    no local file (a remote file, or one `datasets` will report missing)."""
    if data_files is None:
        return None
    table = data_files if isinstance(data_files, dict) else {"train": data_files}
    out: dict[str, list[Path]] = {}
    for split, names in table.items():
        files: list[Path] = []
        for name in data_file_names(names):
            found = local_data_files(name, base)
            if not found:
                return None
            files += found
        out[str(split)] = files
    return out

"""Where each row of a user's data file came from (the file and its line), so that an
error about a row names a line the user can open, not a row number counted after the
seeded train/test shuffle.

`datasets` keeps no such record; the files are scanned here for the line each record starts
on (a quoted CSV field may span lines), in the order `datasets` reads them. When a scan
does not count as many records as `datasets` loaded, rows are named by their place in
the split as loaded instead (never a guessed line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The column that carries each row's index in its split as loaded, through the held-out
# draw; removed before the corpus is returned.
ROW_COLUMN = "__fedtune_row__"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
# How many places an error names before "and N more".
SHOWN = 5


@dataclass(frozen=True)
class Place:
    """One row's origin: `where` ("data file F" or "dataset 'x' split 'train'"), `unit`
    ("line" of the file or "row" of the split as loaded) and its 1-based number."""

    where: str
    unit: str
    number: int

    def __str__(self) -> str:
        return f"{self.where} {self.unit} {self.number}"


def places_text(places: Iterable[Place], shown: int = SHOWN) -> str:
    """`places` in one phrase, grouped by file, in file order: "data file a.csv lines 3, 5
    and 2 more"."""
    places = sorted(places, key=lambda p: (p.where, p.number))
    groups: dict[tuple[str, str], list[int]] = {}
    for place in places[:shown]:
        groups.setdefault((place.where, place.unit), []).append(place.number)
    text = "; ".join(f"{where} {unit}{'s' if len(numbers) > 1 else ''} "
                     f"{', '.join(map(str, numbers))}"
                     for (where, unit), numbers in groups.items())
    more = len(places) - shown
    return f"{text} and {more} more" if more > 0 else text


def record_lines(path: Path, delimiter: str | None) -> list[int] | None:
    """The line each record of `path` starts on: a CSV record after the header row
    (`delimiter` given; blank lines are skipped, as pandas does), or each non-blank line of
    a JSON Lines file (`delimiter` None). None for a file read otherwise (a JSON array)."""
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            if delimiter is None:
                return _json_lines(fh)
            reader = csv.reader(fh, delimiter=delimiter)
            starts: list[int] = []
            header = True
            end = 0
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0]):
                    continue
                if header:
                    header = False
                    continue
                starts.append(start)
            return starts
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _json_lines(fh: Iterable[str]) -> list[int] | None:
    starts = []
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        if not starts and not line.lstrip().startswith("{"):
            return None  # a JSON array or one object: not a record per line
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return None  # one object over several lines
        starts.append(number)
    return starts


class RowOrigins:
    """For each split as loaded, the place of each of its rows. `files`: split -> the files
    `datasets` reads for it, in its order; `delimiter`: the CSV delimiter (None: JSON Lines).
    A split whose files cannot be scanned, or whose scan disagrees with the loaded row
    count, is described by row (`dataset`: how that phrase names the data)."""

    def __init__(self, files: dict[str, list[Path]] | None, delimiter: str | None,
                 dataset: str) -> None:
        self._files = files or {}
        self._delimiter = delimiter
        self._dataset = dataset
        self._places: dict[str, list[Place] | None] = {}

    def _scan(self, split: str, rows: int) -> list[Place] | None:
        if split not in self._places:
            places: list[Place] | None = []
            for file in self._files.get(split, []):
                lines = record_lines(file, self._delimiter)
                if lines is None or places is None:
                    places = None
                    break
                places += [Place(f"data file {file}", "line", n) for n in lines]
            if not self._files.get(split) or (places is not None and len(places) != rows):
                places = None
            self._places[split] = places
        return self._places[split]

    def place(self, split: str, row: int, rows: int) -> Place:
        """Where row `row` (0-based) of the loaded split `split` (`rows` rows) came from."""
        places = self._scan(split, rows)
        if places is not None:
            return places[row]
        return Place(f"{self._dataset} split {split!r} (as loaded, before any held-out draw)",
                     "row", row + 1)

"""Texts to classify, from a file: CSV or TSV with a header row (the text column, and the
label column when present), JSON lines with a `text` (and optionally a `label`), or plain
text (`.txt`) with one text per line; and the checks on `fedtune predict`'s other flags.
A file of any other kind is refused: its lines would be "classified" as texts (a CSV's
header included, each with ",ham" glued on)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config.checks import ascii_digits

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig

# An input file's size, at most: it is read whole and its texts held in memory (a language
# model's prompts also as token ids, all checked before the first is continued). 64 MiB is
# hundreds of thousands of texts; a larger file goes in parts.
MAX_INPUT_BYTES = 64 << 20

# (text column names, label column names), each tried in order.
Columns = tuple[tuple[str, ...], tuple[str, ...]]
DEFAULT_COLUMNS: Columns = (("text",), ("label",))


class PredictInputError(ValueError):
    """An input file line that cannot be read as a text (or its label)."""


def input_columns(cfg: ExperimentConfig) -> Columns:
    """The columns a file to classify may name its texts and labels by: the run's own
    (`data.options.text_field` / `label_field` of an `hf` corpus), then "text" / "label"."""
    options = cfg.data.options if cfg.data.corpus == "hf" else {}
    names = []
    for option, default in (("text_field", "text"), ("label_field", "label")):
        given = options.get(option)
        names.append(tuple(dict.fromkeys([given, default] if isinstance(given, str)
                                         else [default])))
    return names[0], names[1]


def read_texts(path: Path, label_names: tuple[str, ...], columns: Columns = DEFAULT_COLUMNS
               ) -> tuple[list[str], list[int] | None]:
    """Texts, and their label ids when every row has a label (a label name or id). Labels
    on only some rows is an error, not a partial accuracy. The format is the file's suffix
    (`FORMATS`); any other suffix is refused."""
    rows = read_rows(path, columns)
    texts = [t for _, t, _ in rows]
    labels = [None if y is None else _label_id(y, label_names, f"{path} line {n}")
              for n, _, y in rows]
    given = [x for x in labels if x is not None]
    if not given:
        return texts, None
    if len(given) != len(labels):
        unit = "lines" if path.suffix.lower() in (".jsonl", ".ndjson") else "rows"
        raise PredictInputError(f"{path}: {len(given)} of {len(labels)} {unit} have a label; "
                                "give every one a label or none")
    return texts, given


# JSON's whitespace (RFC 8259): a line of only these is blank; any other character is JSON
# to parse, or refused (str.strip() would also drop a line of U+0085 or U+2028 unread).
_JSON_SPACE = " \t\r"

# A file's rows: (line number, text, label or None)
Rows = list[tuple[int, str, object]]


def read_rows(path: Path, columns: Columns = DEFAULT_COLUMNS) -> Rows:
    """The file's rows as read, each with its line number and its label as written (None
    where it has none): for a caller that decides itself what a label means (a language
    model's texts have none). A file without a row is refused, as by `read_texts`."""
    text = _read_text(path)
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise PredictInputError(f"cannot tell the format of {path}: name it "
                                f"{', '.join(FORMATS)} (CSV and TSV with a header row)")
    rows = reader(path, text, columns)
    if not rows:
        raise PredictInputError(f"{path} holds no texts")
    return rows


def _plain_rows(path: Path, text: str, columns: Columns) -> Rows:
    return [(n, line, None) for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()]


def json_lines(text: str) -> list[str]:
    """`text`'s lines as JSON Lines defines them: ended by "\n" (a "\r" before it is JSON
    whitespace, dropped). Not str.splitlines(), which also breaks at U+2028, U+2029 and
    U+0085, which JSON allows raw inside a string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl_rows(path: Path, text: str, columns: Columns) -> Rows:
    rows: Rows = []
    for num, line in enumerate(json_lines(text), start=1):
        if not line.strip(_JSON_SPACE):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PredictInputError(f"{path}:{num}: not JSON ({exc.msg})") from None
        field = next((c for c in columns[0] if isinstance(row, dict) and c in row), "text")
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise PredictInputError(f'{path}:{num}: expected an object with a "{field}" '
                                    "string")
        if "\0" in row[field]:
            # A JSON escape (\u0000) gets past the file's NUL-byte check: the same refusal.
            raise PredictInputError(f'{path}:{num}: the "{field}" string holds a NUL '
                                    "character (\\u0000); give text")
        label = next((row[c] for c in columns[1] if c in row), None)
        rows.append((num, row[field], label))
    return rows


def _delimited_rows(delimiter: str) -> Callable[[Path, str, Columns], Rows]:
    def read(path: Path, text: str, columns: Columns) -> Rows:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next((r for r in reader if any(c.strip() for c in r)), None)
            if header is None:
                return []
            found = _column(header, columns[0])
            if found is None:
                raise PredictInputError(
                    f"{path}: no text column (looked for {', '.join(map(repr, columns[0]))}); "
                    f"columns: {header}; the first row must name the columns")
            label_at = _column(header, columns[1])
            rows: Rows = []
            end = reader.line_num
            for record in reader:
                start, end = end + 1, reader.line_num
                if not any(c.strip() for c in record):
                    continue
                if len(record) != len(header):
                    raise PredictInputError(f"{path} line {start}: {len(record)} fields, the "
                                            f"header has {len(header)}")
                label = record[label_at] if label_at is not None else None
                rows.append((start, record[found], label if label else None))
            return rows
        except csv.Error as exc:
            raise PredictInputError(f"{path} line {reader.line_num}: not CSV ({exc})") from None

    return read


def _column(header: Sequence[str], names: Sequence[str]) -> int | None:
    stripped = [h.strip() for h in header]
    return next((stripped.index(n) for n in names if n in stripped), None)


FORMATS: dict[str, Callable[[Path, str, Columns], Rows]] = {
    ".csv": _delimited_rows(","), ".tsv": _delimited_rows("\t"),
    ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".txt": _plain_rows,
}


def _label_id(value: object, label_names: tuple[str, ...], where: str) -> int:
    if isinstance(value, str) and value in label_names:
        return label_names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
        return value
    if isinstance(value, str) and ascii_digits(value.strip()) and int(value) < len(label_names):
        return int(value)  # a CSV cell holding an id
    raise PredictInputError(f"{where}: label {value!r} is neither one of "
                            f"{list(label_names)} nor an id 0..{len(label_names) - 1}")


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise PredictInputError(f"input file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise PredictInputError(f"{path} is {size / 2**20:.1f} MiB, more than the "
                                f"{MAX_INPUT_BYTES >> 20} MiB one --file may hold (it is read "
                                "whole): split it and predict each part")
    data = path.read_bytes()
    # NUL is valid UTF-8 but never in a text to classify: it marks a binary file (a model,
    # an archive) given by mistake, which would otherwise be "classified" line by line.
    if b"\0" in data:
        raise PredictInputError(f"{path} is not text (it holds NUL bytes); give UTF-8 text, "
                                "one text per line, or .jsonl lines")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PredictInputError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                "re-save it as UTF-8") from None


def check_predict_options(batch_size: int | None, out: Path | None) -> None:
    """`fedtune predict`'s flags, checked before the model loads: a batch size below one
    classified nothing (and then crashed), and `--out` a folder failed after the work."""
    if batch_size is not None and batch_size < 1:
        raise PredictInputError(f"--batch-size must be >= 1, got {batch_size}")
    if out is None:
        return
    if out.is_dir():
        raise PredictInputError(f"--out {out} is a folder; give a file path")
    if not out.parent.is_dir():
        raise PredictInputError(f"--out {out}: folder {out.parent} does not exist")

"""Texts to classify, from a file: JSON lines with a `text` (and optionally a `label`), or
plain text with one text per line; and the checks on `fedtune predict`'s other flags."""

from __future__ import annotations

import json
from pathlib import Path


class PredictInputError(ValueError):
    """An input file line that cannot be read as a text (or its label)."""


def read_texts(path: Path, label_names: tuple[str, ...]
               ) -> tuple[list[str], list[int] | None]:
    """Texts, and their label ids when every line of a JSON-lines file has a `label` (a
    label name or id). Labels on only some lines is an error, not a partial accuracy."""
    lines = _text_lines(path)
    if not any(line.strip() for line in lines):
        raise PredictInputError(f"{path} holds no texts")
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()], None
    texts: list[str] = []
    labels: list[int | None] = []
    for num, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PredictInputError(f"{path}:{num}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise PredictInputError(f'{path}:{num}: expected an object with a "text" string')
        texts.append(row["text"])
        labels.append(None if "label" not in row else _label_id(row["label"], label_names,
                                                                 f"{path}:{num}"))
    given = [x for x in labels if x is not None]
    if not given:
        return texts, None
    if len(given) != len(labels):
        raise PredictInputError(f"{path}: {len(given)} of {len(labels)} lines have a label; "
                                "give every line a label or none")
    return texts, given


def _label_id(value: object, label_names: tuple[str, ...], where: str) -> int:
    if isinstance(value, str) and value in label_names:
        return label_names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
        return value
    raise PredictInputError(f"{where}: label {value!r} is neither one of "
                            f"{list(label_names)} nor an id 0..{len(label_names) - 1}")


def _text_lines(path: Path) -> list[str]:
    if path.is_dir():
        raise PredictInputError(f"input file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    data = path.read_bytes()
    # NUL is valid UTF-8 but never in a text to classify: it marks a binary file (a model,
    # an archive) given by mistake, which would otherwise be "classified" line by line.
    if b"\0" in data:
        raise PredictInputError(f"{path} is not text (it holds NUL bytes); give UTF-8 text, "
                                "one text per line, or .jsonl lines")
    try:
        return data.decode("utf-8").splitlines()
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

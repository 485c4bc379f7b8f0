"""The delimiter of a user's CSV or TSV files: `data.options.delimiter`, else a tab for
`.tsv` files and a comma otherwise. A tab-separated file read with commas made pandas
report "Expected 1 fields in line 3, saw 2" (or load one column named "text\\tlabel"):
such a file is recognised by its first line and refused with the fix."""

from __future__ import annotations

from pathlib import Path

TAB_HINT = "set data.options.delimiter = '\\t' or name it .tsv"


class DelimiterError(ValueError):
    """A delimiter option or a file that does not fit it; the message says the fix."""


def csv_delimiter(builder: str, files: list[Path], delimiter: str | None) -> str | None:
    """The delimiter `datasets`' CSV builder is to read `files` with (None: `builder` is
    not CSV)."""
    if delimiter is not None:
        if builder != "csv":
            raise DelimiterError(f"data.options.delimiter applies to path='csv' (CSV and TSV "
                                 f"files), not path={builder!r}")
        if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
            raise DelimiterError(f"data.options.delimiter={delimiter!r} must be one "
                                 "character other than a quote or a line break, e.g. ';' "
                                 "or '\\t'")
        return delimiter
    if builder != "csv":
        return None
    suffixes = {f.suffix.lower() for f in files}
    if ".tsv" in suffixes:
        if len(suffixes) > 1:
            raise DelimiterError(f"data.options.data_files mixes {' and '.join(sorted(suffixes))}"
                                 " files; give data.options.delimiter (one for all of them) "
                                 "or name them alike")
        return "\t"
    for file in files:
        if looks_tab_separated(file, ","):
            raise DelimiterError(f"data file {file} looks tab-separated (its first line has "
                                 f"tabs and no commas): {TAB_HINT}")
    return ","


def looks_tab_separated(file: Path, delimiter: str) -> bool:
    """The first non-blank line of `file` has tabs and no `delimiter`."""
    first = first_line(file)
    return "\t" in first and delimiter not in first


def first_line(file: Path) -> str:
    try:
        with file.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    return line
    except OSError:
        pass
    return ""

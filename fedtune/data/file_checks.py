"""What can be told about a corpus from its config and the first line of its files, before
anything starts: `data.options` against the corpus loader's signature (names, required ones,
types), and each local data file (it exists, can be read, is UTF-8, and its header names the
text and label columns).

`fedtune run` calls `check_corpus_config` before Ray, the model or the data pass (each costs
seconds to minutes); the loaders (fedtune.data.corpora) still check everything again when they
read the rows, so nothing here has to be exhaustive: only cheap and never wrong. Every
failure is a `CorpusError` of one line naming the option or the file and the fix.
"""

from __future__ import annotations

import csv
import inspect
import json
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.data.corpora import PACKAGED_BUILDERS, CorpusError, corpus_options
from fedtune.data.text_files import DataFileError, check_text_file, data_file_names

# A file larger than this is checked for UTF-8 on its first block only (its header); the
# loader decodes it whole anyway. The whole-file check costs ~1 s per GB.
WHOLE_FILE_MAX = 64 << 20
_HEAD = 1 << 20
CSV_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".json", ".jsonl")


def check_corpus_config(corpus: str, options: dict[str, Any],
                        bases: Sequence[Path] = (), unlabelled: bool = False) -> None:
    """`data.options` of `corpus`, then the files it names. `bases`: the folders a relative
    data file may be read from, first the one the loader uses (the current directory).
    `unlabelled` (a task kind whose rows are texts alone): no label column is required."""
    check_options(corpus, options)
    file_check = FILE_CHECKS.get(corpus)
    if file_check is not None:
        if unlabelled:
            options = {**options, _UNLABELLED: True}
        file_check(options, list(bases) or [Path.cwd()])


# Set in the options a file check gets (never a `data.options` key: checked before).
_UNLABELLED = "\0unlabelled"


def check_options(corpus: str, options: dict[str, Any]) -> None:
    """Names, required names and types of `options`, read from the loader's own signature
    (the same list `load_corpus` checks): a typo is refused before the run starts."""
    from fedtune.data.corpora import _loader  # the registry's lookup, this package's own

    allowed = corpus_options(corpus)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CorpusError(f"data.options {unknown} not accepted by corpus {corpus!r}; "
                          f"allowed: {', '.join(allowed) or '(none)'}")
    loader = _loader(corpus)
    params = inspect.signature(loader).parameters
    missing = [k for k in allowed
               if params[k].default is inspect.Parameter.empty and k not in options]
    if missing:
        raise CorpusError(f"corpus {corpus!r} needs data.options {missing}")
    for key, value in options.items():
        kinds = _annotation_types(loader, params[key].annotation)
        if kinds is None or value is None:
            continue
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds
                                               and int in kinds)
        if isinstance(value, int) and not isinstance(value, bool) and float in kinds:
            ok = True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise CorpusError(f"data.options.{key}={value!r} has type {type(value).__name__}; "
                              f"corpus {corpus!r} expects {names}")


def _annotation_types(loader: Callable[..., Any], annotation: Any
                      ) -> tuple[type, ...] | None:
    """The classes an option's annotation allows, or None when it cannot be told (Any, a
    generic, a name that does not resolve here): then only the loader checks it."""
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, dict(getattr(loader, "__globals__", {})))  # noqa: S307
        except Exception:  # noqa: BLE001 (a name only the type checker sees)
            return None
    members = (annotation.__args__ if isinstance(annotation, types.UnionType)
               else (annotation,))
    if not all(isinstance(m, type) and m is not Any for m in members):
        return None
    return tuple(members)


# --- data files -----------------------------------------------------------------------------

def _check_hf_files(options: dict[str, Any], bases: list[Path]) -> None:
    path = options.get("path")
    if not isinstance(path, str):
        return
    folder = Path(path).expanduser()
    builder = path if path in PACKAGED_BUILDERS else None
    if builder is None and not folder.is_dir():
        return  # a dataset from the Hugging Face cache: its files are not the user's
    if folder.is_dir():
        bases = [folder]
    text_field = options.get("text_field", "text")
    label_field = None if options.get(_UNLABELLED) else options.get("label_field", "label")
    delimiter = options.get("delimiter")
    for name in data_file_names(options.get("data_files")):
        if "://" in name:
            continue  # remote: datasets reports it
        for file in _resolve(name, bases):
            check_data_file(file, builder, text_field, label_field, delimiter)


def _check_spamassassin_file(options: dict[str, Any], bases: list[Path]) -> None:
    path = options.get("path")
    if not isinstance(path, (str, Path)):
        return
    found = _resolve(str(path), bases, option="data.options.path", noun="corpus file")
    check_data_file(found[0], None, None, None, None)


# corpus name -> its file check (options, folders a relative name is read from).
FILE_CHECKS: dict[str, Callable[[dict[str, Any], list[Path]], None]] = {
    "hf": _check_hf_files,
    "spamassassin": _check_spamassassin_file,
}


def _resolve(name: str, bases: list[Path], option: str = "data.options.data_files",
             noun: str = "data file") -> list[Path]:
    """The files `name` (a path or a glob) names, from the first base folder where it
    matches; a name that matches nothing is refused with every place looked in."""
    import glob

    pattern = Path(name).expanduser()
    roots = [None] if pattern.is_absolute() else bases
    for root in roots:
        full = pattern if root is None else root / pattern
        if glob.has_magic(str(full)):
            hits = [Path(p) for p in sorted(glob.glob(str(full), recursive=True))]
            hits = [p for p in hits if p.is_file()]
        else:
            hits = [full] if full.exists() else []
        if hits:
            for hit in hits:
                if hit.is_dir():
                    raise CorpusError(f"{noun} {hit} is a folder, not a file ({option}); "
                                      "name the file(s) in it")
            return hits
    where = ("" if pattern.is_absolute() else
             " (relative names are read from " + " or ".join(str(b) for b in bases) + ")")
    what = "matches no file" if glob.has_magic(name) else "not found"
    raise CorpusError(f"{noun} {what}: {name} ({option}){where}")


def check_data_file(file: Path, builder: str | None, text_field: str | None,
                    label_field: str | None, delimiter: str | None) -> None:
    """`file` can be read, is UTF-8 (for a text format), and its first line names the
    text and label columns (CSV/TSV header, or the first JSON Lines record)."""
    try:
        with file.open("rb") as fh:
            head = fh.read(_HEAD)
            size = fh.seek(0, 2)
    except OSError as exc:
        raise CorpusError(f"data file {file} cannot be read: {exc.strerror or exc}") from None
    suffix = file.suffix.lower()
    try:
        if size <= WHOLE_FILE_MAX:
            check_text_file(file)
        elif suffix in CSV_SUFFIXES + JSON_SUFFIXES:
            head.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"data file {file} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason}); re-save it as UTF-8") from None
    except DataFileError as exc:
        raise CorpusError(str(exc)) from None
    if text_field is None:
        return
    first = head.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    line = next((ln for ln in first if ln.strip()), "")
    kind = builder or ("csv" if suffix in CSV_SUFFIXES else
                       "json" if suffix in JSON_SUFFIXES else None)
    if kind == "csv":
        sep = delimiter if isinstance(delimiter, str) and len(delimiter) == 1 else (
            "\t" if suffix == ".tsv" else ",")
        try:
            columns = [c.strip() for c in next(csv.reader([line], delimiter=sep), [])]
        except csv.Error as exc:  # a NUL byte, an unterminated quote: the loader says more
            raise CorpusError(f"data file {file}: its header line cannot be read as "
                              f"{'TSV' if sep == chr(9) else 'CSV'} ({exc})") from None
        _require_columns(file, "its header", columns, text_field, label_field, sep, line)
    elif kind == "json" and line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return  # one JSON document over many lines: the loader reads it
        if isinstance(record, dict):
            _require_columns(file, "its first record", list(record), text_field,
                             label_field, None, line)


def _require_columns(file: Path, where: str, columns: list[str], text_field: str,
                     label_field: str | None, sep: str | None, line: str) -> None:
    for option, field in (("text_field", text_field), ("label_field", label_field)):
        if field is None or field in columns:
            continue
        hint = f"set data.options.{option} to the {option.split('_')[0]} column"
        if sep is not None and len(columns) <= 1:
            other = next((d for d in ("\t", ";", "|", ",") if d != sep and d in line), None)
            if other is not None:
                hint = (f"the header has one column when split at {sep!r} but holds "
                        f"{other!r}: {_delimiter_hint(other)}")
        shown = ", ".join(repr(c[:40]) for c in columns[:12]) or "(none)"
        raise CorpusError(f"data file {file}: {where} has no column {option}={field!r} "
                          f"(columns: {shown}); {hint}")


def _delimiter_hint(sep: str) -> str:
    if "delimiter" in corpus_options("hf"):
        return f"set data.options.delimiter={sep!r}"
    return "name a tab-separated file .tsv" if sep == "\t" else "re-save it comma-separated"

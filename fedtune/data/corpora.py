"""Corpus registry: a name -> a `DatasetDict` with "train" and "test" splits and at least
`id` (str), `text` (str) and `label` (int) columns.

Experiments name their corpus in config (`data.corpus`, `data.options`), so loaders are
registered by name rather than chosen by an if-chain, and each loader's keyword-only
signature is the list of options it accepts: a typo in an option is an error, not a default.

Built-ins: `spamassassin` (bundled, see fedtune/data/spamassassin/README.md) and `hf` (any
Hugging Face dataset: a hub name from the local cache, or a builder such as "csv"/"json" with
local `data_files`).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.data.delimited import TAB_HINT, DelimiterError, csv_delimiter, looks_tab_separated
from fedtune.data.labels import (
    LabelError,
    as_class_label,
    check_class_names,
    check_label_ids,
    check_string_labels,
)
from fedtune.data.row_origin import ROW_COLUMN, Place, RowOrigins
from fedtune.data.text_files import (
    DataFileError,
    check_text_file,
    data_file_names,
    local_data_files,
    local_files_by_split,
)
from fedtune.data.tokenize import default_cache_dir

if TYPE_CHECKING:
    import datasets

# Imported where used: `datasets` (pyarrow, pandas) costs ~1 s of CPU to import, and Ray
# actors that get their task from the driver (fedtune.task.task bundles) never load a corpus.
CorpusLoader = Callable[..., "datasets.DatasetDict"]
_CORPORA: dict[str, CorpusLoader] = {}
SPAMASSASSIN_FILE = "spamassassin.jsonl.gz"


class CorpusError(ValueError):
    """A corpus cannot be loaded as configured; the message names the file or option at fault."""


# (the corpus options) -> every local file the loader reads, or None when it cannot say
# (e.g. a dataset from the Hugging Face cache): what a cache of its results is keyed by.
SourceLister = Callable[..., "list[Path] | None"]
_SOURCES: dict[str, SourceLister] = {}


def register_corpus(name: str, sources: SourceLister | None = None
                    ) -> Callable[[CorpusLoader], CorpusLoader]:
    """Register a loader under `name`. Its keyword-only parameters are the corpus options.
    `sources(**options)` lists the files the loader reads (None: unknown); a corpus without
    it is never taken from the task cache (`fedtune.task.cache`)."""

    def deco(loader: CorpusLoader) -> CorpusLoader:
        _CORPORA[name] = loader
        if sources is not None:
            _SOURCES[name] = sources
        return loader

    return deco


def corpus_sources(name: str, options: dict[str, Any]) -> list[Path] | None:
    """The local files corpus `name` reads with `options`, or None when that cannot be
    told without loading it (then nothing derived from it is cached across runs)."""
    lister = _SOURCES.get(name)
    if lister is None:
        return None
    try:
        return lister(**options)
    except (TypeError, OSError):  # options the loader will refuse with its own message
        return None


def available_corpora() -> list[str]:
    """Registered corpus names, sorted."""
    return sorted(_CORPORA)


# Keyword arguments fedtune itself passes to a loader that declares them; never a
# `data.options` key.
RUN_ARGUMENTS = ("cache_root", "labels", "unlabelled")


def corpus_options(name: str) -> list[str]:
    """The option names corpus `name` accepts."""
    params = inspect.signature(_loader(name)).parameters.values()
    return [p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in RUN_ARGUMENTS]


def _loader(name: str) -> CorpusLoader:
    if name not in _CORPORA:
        raise CorpusError(f"data.corpus={name!r} is not one of: {', '.join(available_corpora())}")
    return _CORPORA[name]


def load_corpus(name: str, /, cache_root: Path | None = None,
                labels: list[str] | None = None, unlabelled: bool = False,
                **options: Any) -> datasets.DatasetDict:
    """Load corpus `name` with its `options` (`data.options` in an experiment config).
    `cache_root` is fedtune's cache folder of the run (`[runtime] cache_dir`; default: the
    environment's or ~/.cache/fedtune): loaders that copy the user's files keep them there.
    `labels` (`data.labels`): the declared classes, in order; a loader that takes them
    checks every row against them, any other corpus must have exactly these classes.
    `unlabelled` (a task kind whose rows are texts alone, such as causal_lm): a loader that
    declares it needs no label column (its rows get label 0), and no class is checked."""
    loader = _loader(name)
    allowed = corpus_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CorpusError(f"data.options {unknown} not accepted by corpus {name!r}; "
                          f"allowed: {', '.join(allowed) or '(none)'}")
    params = inspect.signature(loader).parameters
    missing = [k for k in allowed
               if params[k].default is inspect.Parameter.empty and k not in options]
    if missing:
        raise CorpusError(f"corpus {name!r} needs data.options {missing}")
    if cache_root is not None and "cache_root" in params:
        options = {**options, "cache_root": Path(cache_root)}
    if labels and "labels" in params:
        options = {**options, "labels": list(labels)}
    if unlabelled and "unlabelled" in params:
        options = {**options, "unlabelled": True}
    corpus = loader(**options)
    if unlabelled:
        return corpus
    if labels and "labels" not in params:
        try:
            check_class_names(getattr(corpus["train"].features["label"], "names", []),
                              labels, f"corpus {name!r}")
        except LabelError as exc:
            raise CorpusError(str(exc)) from None
    _check_classes(corpus["train"], name)
    return corpus


def _check_classes(train: datasets.Dataset, name: str) -> None:
    """A classifier needs two classes to learn from: with one, the head has a single
    output, every prediction is right and the run reports accuracy 1.0."""
    present = sorted(set(train["label"]))
    if len(present) >= 2:
        return
    names = getattr(train.features["label"], "names", None)
    held = (f"only label {names[present[0]] if names else present[0]!r}" if present
            else "no rows")
    raise CorpusError(f"corpus {name!r}: the training split holds {held}; a classifier "
                      "needs at least 2 classes in its training data")


def _check_type(option: str, value: Any, kinds: type | tuple[type, ...]) -> None:
    if value is not None and not isinstance(value, kinds):
        raise CorpusError(f"data.options.{option}={value!r} has type {type(value).__name__}; "
                          f"expected {kinds}")


# --- spamassassin ---------------------------------------------------------------------------

_SPAM_COLUMNS = ("id", "text", "label", "collection", "group", "mailing_list")


def _spam_features() -> datasets.Features:
    import datasets

    string = datasets.Value("string")
    return datasets.Features({name: datasets.ClassLabel(names=["ham", "spam"])
                              if name == "label" else string for name in _SPAM_COLUMNS})

_SPLITS = ("train", "test")


def _read_spamassassin(file: Path) -> datasets.DatasetDict:
    import datasets

    columns: dict[str, dict[str, list]] = {s: {k: [] for k in _SPAM_COLUMNS} for s in _SPLITS}
    try:
        with gzip.open(file, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                rec = json.loads(line)
                split = rec.pop("split", None) if isinstance(rec, dict) else None
                if split not in columns or set(rec) != set(_SPAM_COLUMNS):
                    raise CorpusError(f"corpus file {file} is malformed at line {lineno}: "
                                      f"expected fields {sorted(_SPAM_COLUMNS)} + split")
                if rec["label"] not in (0, 1):
                    raise CorpusError(f"corpus file {file} is malformed at line {lineno}: "
                                      f"label={rec['label']!r}, expected 0 or 1")
                for key, value in rec.items():
                    columns[split][key].append(value)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"corpus file {file} is malformed: {exc}") from None
    out = {}
    for split, cols in columns.items():
        if not cols["id"]:
            raise CorpusError(f"corpus file {file} has no {split!r} rows")
        # The file lists all ham, then all spam. A fixed shuffle (by a hash of the id) makes
        # any prefix of a split (a quick evaluation, a small run) a fair sample.
        order = sorted(range(len(cols["id"])), key=lambda i: _shuffle_key(cols["id"][i]))
        cols = {k: [v[i] for i in order] for k, v in cols.items()}
        out[split] = datasets.Dataset.from_dict(cols, features=_spam_features())
    return datasets.DatasetDict(out)


def _shuffle_key(example_id: str) -> str:
    return hashlib.sha1(example_id.encode()).hexdigest()


def _spamassassin_sources(*, path: str | None = None) -> list[Path] | None:
    if path is not None:
        file = Path(path).expanduser() if isinstance(path, (str, Path)) else None
    else:
        ref = resources.files("fedtune.data").joinpath("spamassassin", SPAMASSASSIN_FILE)
        file = ref if isinstance(ref, Path) else None  # a zipped install has no local path
        if file is not None and not file.is_file():
            file = _installed_copy()
    return [file] if file is not None and file.is_file() else None


@register_corpus("spamassassin", sources=_spamassassin_sources)
def load_spamassassin(*, path: str | None = None) -> datasets.DatasetDict:
    """The bundled SpamAssassin corpus, or a file of the same format at `path` (e.g. one
    rebuilt with different settings by `python -m fedtune.data.build_spamassassin`).
    Rows of each split are in sha1(id) order: fixed, and not grouped by label."""
    _check_type("path", path, (str, Path))
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise CorpusError(f"corpus file not found: {file} (data.options.path)")
        return _read_spamassassin(file)
    ref = resources.files("fedtune.data").joinpath("spamassassin", SPAMASSASSIN_FILE)
    with resources.as_file(ref) as file:
        if not file.is_file():
            file = _installed_copy() or file
        if not file.is_file():
            raise CorpusError(f"corpus file not found: {file}; the bundled SpamAssassin corpus "
                              "is missing from this install (rebuild it with "
                              "`python -m fedtune.data.build_spamassassin`)")
        return _read_spamassassin(file)


def _installed_copy() -> Path | None:
    """The corpus of the installed fedtune distribution. Needed under `flwr run`, which
    imports fedtune from the app bundle (FAB), and a FAB carries no .gz files."""
    import importlib.metadata
    from urllib.parse import unquote, urlparse

    rel = f"fedtune/data/spamassassin/{SPAMASSASSIN_FILE}"
    try:
        dist = importlib.metadata.distribution("fedtune")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [Path(str(dist.locate_file(rel)))]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file:"):
        candidates.insert(0, Path(unquote(urlparse(direct["url"]).path)) / rel)
    return next((c for c in candidates if c.is_file()), None)


# --- hf -------------------------------------------------------------------------------------

def _root_cause(exc: BaseException) -> str:
    """The innermost explicit cause, on one line: datasets wraps a parse error (the part
    that says what is wrong) in a generic "error while generating the dataset"."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split()) or "no data"
    return f"{type(exc).__name__}: {text}"


def _is_string(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _check_no_nulls(ds: datasets.Dataset, split: str, locate: Callable[[str, int], Place],
                    columns: tuple[str, ...] = ("text", "label")) -> None:
    for column, what in ((c, c) for c in columns):
        values = ds[column]
        row = next((i for i, v in enumerate(values) if v is None), None)
        if row is not None:
            raise CorpusError(f"{locate(split, row)}: empty {what}; every row needs a text "
                              "and a label")


def _as_label(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    import datasets

    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return ds
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return ds
    if isinstance(feature, datasets.Value) and feature.dtype == "bool":
        return ds.cast_column("label", datasets.Value("int64"))
    raise CorpusError(f"{where}: label column has type {feature}; expected integers, booleans "
                      "or strings (strings become class names)")


def _classes(out: dict[str, datasets.Dataset], labels: list[str] | None, path: str,
             locate: Callable[[str, int], Place]) -> dict[str, datasets.Dataset]:
    """The label column of each split as classes, checked (fedtune.data.labels)."""
    import datasets

    try:
        if all(_is_string(ds.features["label"]) for ds in out.values()):
            names = check_string_labels({s: [str(v) for v in ds["label"]]
                                         for s, ds in out.items()}, labels, locate)
            return {s: as_class_label(ds, names) for s, ds in out.items()}
        out = {s: _as_label(ds, f"dataset {path!r} split {s!r}") for s, ds in out.items()}
        features = {s: ds.features["label"] for s, ds in out.items()}
        if all(isinstance(f, datasets.ClassLabel) for f in features.values()):
            check_class_names(features["train"].names, labels, f"dataset {path!r}")
        check_label_ids({s: ds["label"] for s, ds in out.items()}, labels, locate)
    except LabelError as exc:
        raise CorpusError(str(exc)) from None
    if labels and not isinstance(features["train"], datasets.ClassLabel):
        return {s: as_class_label(ds, labels) for s, ds in out.items()}
    return out


# `datasets`' packaged builders: with them, `data_files` are all the loader reads.
PACKAGED_BUILDERS = ("csv", "json", "parquet", "text", "arrow", "pandas")


def _hf_sources(*, path: str, data_files: Any = None, **_: Any) -> list[Path] | None:
    """A local folder's files and the local `data_files`; None for a dataset from the
    Hugging Face cache or any data file that is not local."""
    if not isinstance(path, str):
        return None
    local = Path(path).expanduser()
    files: list[Path] = []
    if local.is_dir():
        files += [p for p in sorted(local.rglob("*")) if p.is_file()]
    elif path not in PACKAGED_BUILDERS:
        return None
    for name in data_file_names(data_files):
        found = local_data_files(name, local if local.is_dir() else None)
        if not found:
            return None
        files += found
    return sorted(set(files)) or None


@register_corpus("hf", sources=_hf_sources)
def load_hf(*, path: str, name: str | None = None, data_files: Any = None,
            text_field: str = "text", label_field: str = "label", train_split: str = "train",
            test_split: str | None = None, test_fraction: float = 0.2, seed: int = 0,
            delimiter: str | None = None, cache_dir: str | Path | None = None,
            cache_root: Path | None = None, labels: list[str] | None = None,
            unlabelled: bool = False) -> datasets.DatasetDict:
    """Any HF dataset as a corpus, with its text and label columns renamed to text/label.

    `path`/`name`/`data_files`/`cache_dir` go to `datasets.load_dataset` (e.g. path="csv",
    data_files="mail.csv"). The test split is `test_split` if given (it must exist), else a
    "test" split when the dataset has one, else a seeded `test_fraction` of `train_split`.
    `delimiter`: CSV's field separator (default: a tab for .tsv files, else a comma).
    String labels become a ClassLabel: `labels` (`data.labels`, the declared classes in
    order) or the sorted training labels (fedtune.data.labels checks them); rows without
    an `id` column get "<split>-<row>". An error about a row names its file and line.
    `unlabelled` (set by fedtune for a causal-LM task): no label column is needed or read;
    every row gets label 0.
    """
    import datasets

    for option, value, kinds in (("path", path, str), ("name", name, str),
                                 ("text_field", text_field, str),
                                 ("label_field", label_field, str),
                                 ("train_split", train_split, str),
                                 ("test_split", test_split, str),
                                 ("test_fraction", test_fraction, (int, float)),
                                 ("seed", seed, int), ("cache_dir", cache_dir, (str, Path)),
                                 ("delimiter", delimiter, str),
                                 ("data_files", data_files, (str, list, dict))):
        _check_type(option, value, kinds)
    if not 0 < test_fraction < 1:
        raise CorpusError(f"data.options.test_fraction={test_fraction} must be in (0, 1)")
    if not 0 <= seed < 2**32:  # numpy's seed range (the held-out split is drawn by numpy)
        raise CorpusError(f"data.options.seed={seed} must be in [0, {2**32 - 1}]")
    local = Path(path).expanduser()
    base = local if local.is_dir() else None
    files = local_data_files(data_files, base)
    try:
        for file in files:
            check_text_file(file)
    except DataFileError as exc:
        raise CorpusError(f"{exc} (data.options.data_files)") from None
    try:
        sep = csv_delimiter(path, files, delimiter)
    except DelimiterError as exc:
        raise CorpusError(str(exc)) from None
    if cache_dir is None and (files or local.exists()):
        # The user's own texts: datasets would copy them into its cache in the home
        # folder; they go with fedtune's other caches instead (docs/data.md: Caches).
        cache_dir = (cache_root or default_cache_dir()) / "datasets"
    source = (f"data file {files[0]}" if len(files) == 1
              else f"data.options.path={path!r} (data_files={data_files!r})")
    # Local CSV/JSON files go to datasets as the explicit list (globs expanded) that is
    # scanned for each row's line (fedtune.data.row_origin), so both read the same order.
    by_split = local_files_by_split(data_files, base)
    scanned = (sep if path == "csv" else None if path == "json" else "")
    if by_split is not None and scanned != "":
        data_files = {split: [str(f) for f in found] for split, found in by_split.items()}
    else:
        by_split = None
    extra = {"delimiter": sep} if sep not in (None, ",") else {}
    try:
        loaded = datasets.load_dataset(path, name, data_files=data_files,
                                      cache_dir=str(cache_dir) if cache_dir else None, **extra)
    except (FileNotFoundError, ValueError, ConnectionError, StopIteration,
            datasets.exceptions.DatasetsError) as exc:
        tabbed = [f for f in files if sep is not None and looks_tab_separated(f, sep)]
        hint = f"; {tabbed[0]} looks tab-separated: {TAB_HINT}" if tabbed else ""
        raise CorpusError(f"{source} could not be read as {path!r} data: "
                          f"{_root_cause(exc)}{hint}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise CorpusError(f"dataset {path!r} did not load as named splits")
    if train_split not in loaded:
        raise CorpusError(f"dataset {path!r} has no split train_split={train_split!r}; "
                          f"splits: {list(loaded)}")
    if test_split is not None and test_split not in loaded:
        raise CorpusError(f"dataset {path!r} has no split test_split={test_split!r}; "
                          f"splits: {list(loaded)}")
    test_name = test_split or ("test" if "test" in loaded else None)
    # Each row keeps its index in its split as loaded through the held-out draw, so an
    # error names its file and line, not its place after the seeded shuffle.
    origins = RowOrigins(by_split, scanned or None, f"dataset {path!r}")
    sizes = {s: len(loaded[s]) for s in {train_split, test_name} - {None}}
    numbered = {s: loaded[s].add_column(ROW_COLUMN, range(n)) for s, n in sizes.items()}
    if test_name is not None:
        train, test = numbered[train_split], numbered[test_name]
        loaded_as = {"train": train_split, "test": test_name}
    else:
        parts = numbered[train_split].train_test_split(test_size=test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
        loaded_as = {"train": train_split, "test": train_split}
    out = {}
    for split, ds in (("train", train), ("test", test)):
        where = f"dataset {path!r} split {split!r}"
        needed = (("text_field", text_field),) if unlabelled else (
            ("text_field", text_field), ("label_field", label_field))
        for option, field in needed:
            if field not in ds.column_names:
                tabbed = next((c for c in ds.column_names if "\t" in c), None)
                hint = f" (column {tabbed!r} looks tab-separated: {TAB_HINT})" if tabbed else ""
                raise CorpusError(f"{where} has no column {option}={field!r}; "
                                  f"columns: {ds.column_names}{hint}")
        if unlabelled:  # the texts are the targets: whatever label column there is goes
            ds = ds.remove_columns([c for c in (label_field, "label") if c in ds.column_names
                                    and c != text_field])
            ds = ds.add_column("label", [0] * len(ds))
        renames = {k: v for k, v in ((text_field, "text"), (label_field, "label"))
                   if k != v and k in ds.column_names}
        clash = [v for v in renames.values() if v in ds.column_names]
        ds = ds.remove_columns(clash).rename_columns(renames)
        text = ds.features["text"]
        if not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string")):
            raise CorpusError(f"{where}: text column {text_field!r} has type {text}; "
                              "expected strings")
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [f"{split}-{i}" for i in range(len(ds))])
        elif ds.features["id"] != datasets.Value("string"):
            ds = ds.cast_column("id", datasets.Value("string"))
        out[split] = ds
    rows = {s: ds[ROW_COLUMN] for s, ds in out.items()}

    def locate(split: str, row: int) -> Place:
        loaded_split = loaded_as[split]
        return origins.place(loaded_split, rows[split][row], sizes[loaded_split])

    for split, ds in out.items():
        _check_no_nulls(ds, split, locate, ("text",) if unlabelled else ("text", "label"))
    if not unlabelled:
        out = _classes(out, labels, path, locate)
    return datasets.DatasetDict({s: ds.remove_columns(ROW_COLUMN) for s, ds in out.items()})

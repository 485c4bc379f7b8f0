"""The learning task an experiment defines: frozen backbone + tokenized corpus + the
server's validation rows + the clients' partitions of the other training rows.

No validation or test row is a copy of a training row (fedtune.data.duplicates): test rows
that are go, validation draws pass over them; `Task.copies_removed` counts both.

Built once per process (the server's and each Ray actor's) and shared by every virtual
client that process serves; a client then costs only its partition indices.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import TensorDataset

from fedtune.config import ExperimentConfig, config_from_toml
from fedtune.config.runtime import runtime_settings
from fedtune.config.task import DEFAULT_KIND
from fedtune.data import load_corpus, partition, partition_domains, target_rows, tokenize_cached
from fedtune.data.domains import no_progress_bars
from fedtune.data.duplicates import RowKeys
from fedtune.data.tokenize import tokenizer_fingerprint
from fedtune.data.validation_split import carve_validation, client_rows, passed_over
from fedtune.models import Backbone, backbone_for
from fedtune.run.atomic import write_stream_atomic, write_text_atomic
from fedtune.runtime.startup import phase, record_since
from fedtune.task import cache as task_cache
from fedtune.task.kinds import task_kind
from fedtune.task.rows import Split
from fedtune.tuning import TunedModel, build_tuned_model
from fedtune.wire.delta import DeltaSpec

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass
class Task:
    cfg: ExperimentConfig
    backbone: Backbone
    train: Split
    test: Split
    partitions: list[np.ndarray]
    label_names: tuple[str, ...]
    spec: DeltaSpec
    # Rows of `train` the server validates on (data.validation_fraction); no partition
    # holds any of them. Empty when the fraction is 0.
    validation_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Rows of the corpus' test split that `test` holds (target rows with two domains, less
    # the copies of training rows), ascending; None where unknown.
    test_rows: np.ndarray | None = None
    # Copies of training rows kept out: "validation" = draws of the validation carve passed
    # over, "test" = test rows removed.
    copies_removed: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @cached_property
    def validation(self) -> Split | None:
        """The server's validation split, or None when there is none (then nothing selects)."""
        if self.validation_rows.size == 0:
            return None
        rows = self.validation_rows
        return Split(np.asarray(self.train.input_ids[rows]),
                     np.asarray(self.train.attention_mask[rows]),
                     np.asarray(self.train.labels[rows]))

    def new_model(self) -> TunedModel:
        """A fresh tuned model; identical in every process for the same config (seeded)."""
        return build_tuned_model(self.backbone, self.cfg.tuning, self.num_labels,
                                 seed=self.cfg.seed, kind=self.cfg.task.kind)

    def initial_vector(self) -> np.ndarray:
        return self.spec.flatten(self.new_model().trainable_state())

    def client_data(self, partition_id: int) -> TensorDataset:
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id {partition_id} out of range: the experiment has "
                f"{len(self.partitions)} clients (data.num_clients)"
            )
        return self.train.tensors(self.partitions[partition_id])


def task_key(cfg: ExperimentConfig) -> str:
    """The parts of a config that change the task (not training hyper-parameters)."""
    d = cfg.to_dict()
    d["tuning"] = cfg.tuning.fingerprint()  # other methods' tables change nothing here
    return json.dumps({k: d[k] for k in ("seed", "task", "model", "data", "tuning")},
                      sort_keys=True)


def data_key(cfg: ExperimentConfig) -> str:
    """The parts of a config that shape a task's data (tokens, labels, partitions, validation
    rows): the seed, the task table (its kind picks the rows and their targets), the data
    table and the token length; the tokenizer is keyed apart (`fedtune.task.cache`). Not
    the tuning method nor the rest of the model table."""
    d = cfg.to_dict()
    return json.dumps({"seed": d["seed"], "task": d["task"], "data": d["data"],
                       "max_length": d["model"]["max_length"]}, sort_keys=True)


def get_task(cfg: ExperimentConfig, bundle: str | Path | None = None) -> Task:
    """The task of `cfg`, built once per process. With `bundle` (a folder `write_bundle`
    filled in another process for the same task), read the data from there instead of
    loading, tokenizing and partitioning the corpus; a bundle of another task, or one that
    is gone, is ignored."""
    key = task_key(cfg)
    if bundle is not None and _bundle_key(str(bundle)) == key:
        return _task_from_bundle(key, cfg.to_toml(), str(bundle))
    return _build_task(key, cfg.to_toml())


BUNDLE_META = "task.json"
VALIDATION_ROWS = "validation_rows.npy"
TEST_ROWS = "test_rows.npy"


def write_bundle(task: Task, folder: str | Path) -> Path:
    """Write what a worker process needs to rebuild `task` without its corpus: the token
    and label arrays (references to the token cache's files where the task reads them
    from there, else .npy copies), the partitions' indices (which exclude the validation
    rows), the validation rows and the label names. Workers memory-map the arrays, so they
    share the pages instead of each holding a copy, and skip importing
    `datasets`/flwr-datasets, reading the corpus and partitioning it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split_name in ("train", "test"):
        split = getattr(task, split_name)
        for column in ("input_ids", "attention_mask", "labels"):
            arrays[f"{split_name}.{column}"] = _array_file(getattr(split, column), folder,
                                                           f"{split_name}.{column}")
    sizes = np.asarray([len(p) for p in task.partitions], dtype=np.int64)
    flat = (np.concatenate(task.partitions) if task.partitions else np.zeros(0)).astype(np.int64)
    _save_array(folder / "partitions.npy", flat)
    _save_array(folder / "partition_sizes.npy", sizes)
    _save_array(folder / VALIDATION_ROWS, task.validation_rows.astype(np.int64))
    _save_array(folder / TEST_ROWS, np.asarray(task.test_rows, dtype=np.int64))
    meta = {"key": task_key(task.cfg), "arrays": arrays, "label_names": list(task.label_names),
            "copies_removed": task.copies_removed}
    write_text_atomic(folder / BUNDLE_META, json.dumps(meta))
    return folder


def _array_file(array: np.ndarray, folder: Path, name: str) -> str:
    """An absolute path for an array read from a file elsewhere (a whole .npy file opened
    with np.load(mmap_mode=...) is a memmap whose base is the mmap itself), else the name
    of the copy saved in `folder` (relative: a cached bundle is moved into place)."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return str(array.filename)
    _save_array(folder / f"{name}.npy", np.ascontiguousarray(array))
    return f"{name}.npy"


def _save_array(path: Path, array: np.ndarray) -> None:
    write_stream_atomic(path, lambda fh: np.save(fh, array))


_BUNDLE_KEYS: dict[str, str] = {}


def _bundle_key(folder: str) -> str | None:
    """The task key a bundle was written for; read once per folder, since a worker asks on
    every message (a folder not written yet is asked again)."""
    if folder not in _BUNDLE_KEYS:
        try:
            _BUNDLE_KEYS[folder] = json.loads((Path(folder) / BUNDLE_META).read_text())["key"]
        except (OSError, ValueError, KeyError):
            return None
    return _BUNDLE_KEYS[folder]


@dataclass(frozen=True)
class _BundleData:
    """What a bundle holds: everything of a task but the backbone and the model."""

    train: Split
    test: Split
    partitions: list[np.ndarray]
    validation_rows: np.ndarray
    label_names: tuple[str, ...]
    test_rows: np.ndarray
    copies_removed: dict[str, int]


def _read_bundle(root: Path) -> _BundleData:
    """Read a bundle, memory-mapping its arrays; a ValueError if its parts disagree."""
    meta = json.loads((root / BUNDLE_META).read_text())
    arrays = {name: np.load(root / path, mmap_mode="r") for name, path in meta["arrays"].items()}
    splits = {name: Split(arrays[f"{name}.input_ids"], arrays[f"{name}.attention_mask"],
                          arrays[f"{name}.labels"]) for name in ("train", "test")}
    flat = np.load(root / "partitions.npy")
    sizes = np.load(root / "partition_sizes.npy")
    data = _BundleData(splits["train"], splits["test"],
                       np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else [],
                       np.load(root / VALIDATION_ROWS), tuple(meta["label_names"]),
                       np.load(root / TEST_ROWS),
                       {k: int(v) for k, v in meta["copies_removed"].items()})
    rows = len(data.train)
    for name, split in splits.items():
        if not split.input_ids.shape[0] == split.attention_mask.shape[0] == len(split):
            raise ValueError(f"bundle {root}: the {name} arrays differ in length")
    if (flat.size and not 0 <= flat.min() <= flat.max() < rows) or int(sizes.sum()) != flat.size \
            or (data.validation_rows.size and data.validation_rows.max() >= rows) \
            or (not data.label_names and data.train.labels.ndim == 1) \
            or data.test_rows.size != len(data.test):
        raise ValueError(f"bundle {root}: partitions, validation rows, test rows or labels "
                         "out of range")
    return data


def _assemble(cfg: ExperimentConfig, backbone: Backbone, data: _BundleData) -> Task:
    model = build_tuned_model(backbone, cfg.tuning, len(data.label_names), seed=cfg.seed,
                              kind=cfg.task.kind)
    task_kind(cfg.task.kind).check_model(model, cfg)  # before any round, not at evaluation
    spec = model_spec(model, backbone, cfg, len(data.label_names))
    return Task(cfg, backbone, data.train, data.test, data.partitions, data.label_names, spec,
                validation_rows=data.validation_rows, test_rows=data.test_rows,
                copies_removed=data.copies_removed)


@functools.lru_cache(maxsize=2)
def _task_from_bundle(key: str, cfg_toml: str, folder: str) -> Task:
    cfg = config_from_toml(cfg_toml)
    data = _read_bundle(Path(folder))
    return _assemble(cfg, _backbone(cfg), data)


def _backbone(cfg: ExperimentConfig) -> Backbone:
    """The process-wide backbone of `cfg`'s task kind, its tokenizer made ready for it."""
    kind = task_kind(cfg.task.kind)
    backbone = backbone_for(cfg.model, kind=kind.model_kind)
    kind.check_backbone(backbone, cfg)
    kind.prepare_tokenizer(backbone.tokenizer)
    return backbone


@functools.lru_cache(maxsize=2)
def _build_task(key: str, cfg_toml: str) -> Task:
    cfg = config_from_toml(cfg_toml)
    started = time.perf_counter()
    backbone = _backbone(cfg)
    record_since("model", started, lambda: _model_detail(backbone))
    cache_dir = runtime_settings(cfg).cache_dir
    entry = task_cache.entry_key(data_key(cfg), cfg.data.corpus, cfg.data.options,
                                 tokenizer_fingerprint(backbone.tokenizer))
    if entry is not None and (folder := task_cache.lookup(cache_dir, entry)) is not None:
        try:
            with phase("task", lambda: f"from the cache: {cfg.data.corpus}, tokens, "
                       f"{cfg.data.num_clients} partitions"):
                return _assemble(cfg, backbone, _read_bundle(folder))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("task cache entry %s unreadable (%s); rebuilding it", folder, exc)
            task_cache.discard(folder)
    task = _load_task(cfg, backbone)
    if entry is not None:
        try:
            task_cache.store(cache_dir, entry, lambda folder: write_bundle(task, folder))
        except OSError as exc:  # a full or read-only cache slows the next run, nothing more
            log.warning("task cache: could not store this task under %s: %s", cache_dir, exc)
    return task


def _load_task(cfg: ExperimentConfig, backbone: Backbone) -> Task:
    """Load, tokenize and partition the corpus of `cfg`."""
    cache_dir = runtime_settings(cfg).cache_dir
    kind = task_kind(cfg.task.kind)
    with phase("data", lambda: f"{cfg.data.corpus}, "
               f"{sum(len(corpus[s]) for s in ('train', 'test')):,} rows"):
        corpus = load_corpus(cfg.data.corpus, cache_root=cache_dir, labels=cfg.data.labels,
                             unlabelled=kind.unlabelled, **cfg.data.options)
        corpus = kind.select_rows(corpus, cfg)
    splits = {}
    with phase("tokenize", f"max_length {cfg.model.max_length}"):
        for name in ("train", "test"):
            ds = corpus[name]
            tok = tokenize_cached(ds, backbone.tokenizer, cfg.model.max_length, cache_dir)
            splits[name] = Split(tok["input_ids"], tok["attention_mask"],
                                 kind.targets(ds, tok["input_ids"], tok["attention_mask"]))
    started = time.perf_counter()
    among = None
    test_rows = np.arange(len(splits["test"]), dtype=np.int64)
    if cfg.data.domain_by:
        # With two domains, the utility that counts is the target domain's: test and
        # validation rows are target rows.
        test_rows = target_rows(corpus["test"], cfg.data.domain_by, cfg.data.target_domain,
                                "test")
        among = target_rows(corpus["train"], cfg.data.domain_by, cfg.data.target_domain,
                            "train")
    train, test = splits["train"], splits["test"]
    # Copies are looked for among all training rows, whichever client or domain holds them.
    train_keys = RowKeys(list(corpus["train"]["text"]), train.input_ids, train.attention_mask)
    test_texts = corpus["test"]["text"]
    copied_test = RowKeys([test_texts[int(i)] for i in test_rows], test.input_ids[test_rows],
                          test.attention_mask[test_rows]).found_in(train_keys)
    test_rows = test_rows[~copied_test]
    splits["test"] = Split(test.input_ids[test_rows], test.attention_mask[test_rows],
                           test.labels[test_rows])
    # A training row with a copy elsewhere in the training split is never drawn for
    # validation: the copy would train on a client (or sit beside it in validation).
    copied_train = train_keys.repeated()
    fraction = cfg.data.validation_fraction
    strata = kind.strata(train.labels)  # a classifier's labels; one stratum for an LM
    validation_rows = carve_validation(strata, fraction, cfg.seed, among, copied_train)
    copies_removed = {"validation": passed_over(strata, fraction, cfg.seed, among,
                                                copied_train),
                      "test": int(np.count_nonzero(copied_test))}
    if any(copies_removed.values()):
        log.info("copies of training rows kept out of the task: %(validation)d validation "
                 "draws passed over, %(test)d test rows removed", copies_removed)
    parts = _client_partitions(corpus["train"], validation_rows, cfg)
    data = _BundleData(splits["train"], splits["test"], parts, validation_rows,
                       kind.label_names(corpus["train"]), test_rows, copies_removed)
    task = _assemble(cfg, backbone, data)
    record_since("partitions", started, f"{len(parts)} clients, "
                 f"{validation_rows.size:,} validation rows; copies of training rows kept "
                 f"out: {copies_removed['validation']} validation, {copies_removed['test']} "
                 "test")
    return task


def _model_detail(backbone: Backbone) -> str:
    return f"{backbone.name}, {backbone.num_params / 1e6:.1f} M params"


def _client_partitions(train: datasets.Dataset, validation_rows: np.ndarray,
                       cfg: ExperimentConfig) -> list[np.ndarray]:
    """The clients' index arrays into the whole training split, cut from the rows the
    validation split left."""
    rest = client_rows(len(train), validation_rows)
    with no_progress_bars():  # a selected dataset draws a bar each time it is flattened
        if validation_rows.size:
            train = train.select(rest)
        if cfg.data.domain_by:
            parts = partition_domains(train, cfg.data, cfg.seed)
        else:
            parts = partition(train, cfg.data.partition, cfg.data.num_clients, seed=cfg.seed,
                              alpha=cfg.data.alpha, by=cfg.data.by)
    return [rest[p] for p in parts]


def model_spec(model: TunedModel, backbone: Backbone, cfg: ExperimentConfig, num_labels: int
               ) -> DeltaSpec:
    """The spec of `model`'s trainable tensors: the layout, bound to the backbone weights and
    to everything in the config that shapes the model: the shared tuning fields and the
    active method's table, never another method's (changing `[tuning.lora] r` must not
    orphan a prompt run's checkpoint or export)."""
    bound = {"tuning": cfg.tuning.fingerprint(), "num_labels": num_labels}
    if cfg.task.kind != DEFAULT_KIND:  # a classifier's spec hash stays what it was
        bound["task"] = cfg.task.kind
    return DeltaSpec.from_state(model.trainable_state(), backbone.hash, bound)


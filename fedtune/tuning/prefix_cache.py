"""The frozen-prefix cache: the hidden states entering block L of a set of token rows,
computed once and kept in a bounded folder on disk.

An entry is the float32 array (rows x tokens x hidden) of one row set (a client's examples,
the server's validation or test rows), keyed by everything the states depend on: the
backbone hash (frozen weights, layer pruning included), the tokenizer, the tokenized rows
themselves (which fix max_length) and L. It lives under `runtime.cache_dir`/prefix as
`<key>.<sha>.npy` (the data, memory-mapped when read) and `<key>.json` (the key, the
data's file name, shape and SHA-256), each written to a temp file and renamed, so Ray
actors sharing the folder never see half an entry. A reader checks the key, the shape
and the checksum (once per process and file) and rebuilds an entry that fails any of them:
a corrupt or mismatching file is never trusted. The folder is bounded by
`runtime.prefix_cache_gb`: after each write the least recently used entries (an entry's
`.json` is touched on every hit) are evicted until the total fits.

The states are a function of the rows only, so training from them changes nothing about
DP-SGD: a step's per-sample gradients involve blocks >= L alone, and the Poisson sampler
draws over the same examples (`training_view` hands it row indices instead of tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtune.config import ConfigError
from fedtune.config.runtime import runtime_settings
from fedtune.run.atomic import write_atomic
from fedtune.runtime.torch_setup import model_device
from fedtune.tuning.base import TunedModel

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.tuning.prefix import FrozenPrefix

# Bumped when what an entry holds changes meaning (a new layout, another dtype).
FORMAT = 1
DTYPE = np.float32
# Rows per batch when computing states: a forward without a graph, so larger than training.
FILL_BATCH = 64
# Leftovers of a writer that died (temp files, data no index names) are removed once this
# old; a live writer renames its files within seconds.
STALE_S = 600.0

log = logging.getLogger(__name__)


def prefix_layer(model: TunedModel) -> int:
    """Blocks skipped per example forward when `model` trains from the cache (0: none)."""
    return 0 if model.prefix is None else model.prefix.layer


def cache_applies(cfg: ExperimentConfig, model: TunedModel) -> bool:
    """Whether `model` trains and is evaluated from cached states under `cfg`.
    `train.prefix_cache = "on"` with a model that has no frozen prefix is a ConfigError
    (the config check cannot see the backbone; this can)."""
    setting = cfg.train.prefix_cache
    if setting == "off" or cfg.split.enabled:
        return False
    if model.prefix is None:
        if setting == "on":
            raise ConfigError(f"train.prefix_cache='on': tuning.method={model.method!r} has "
                              "no frozen prefix on this backbone (its blocks could not be "
                              "run one by one); use 'auto' or 'off'")
        return False
    return True


def skipped_layers(cfg: ExperimentConfig, model: TunedModel) -> int:
    """The ledger's `forward_layers_skipped`: blocks a training or evaluation forward of
    one example does not run, from the config and the model (0 when the cache is off)."""
    return prefix_layer(model) if cache_applies(cfg, model) else 0


@dataclass
class CacheStats:
    """What this process's cache did, for tests and benchmarks."""

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0  # misses because an entry was corrupt or did not match
    evicted: int = 0
    too_large: int = 0  # computed, but bigger than the whole bound: not stored


class PrefixCache:
    """Entries under `root`, at most `max_bytes` in all (see the module docstring)."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        # Data files this process has checksummed: (path, inode, size, mtime) -> ok.
        self._verified: set[tuple[str, int, int, int]] = set()

    def states(self, prefix: FrozenPrefix, input_ids: torch.Tensor | np.ndarray,
               attention_mask: torch.Tensor | np.ndarray) -> np.ndarray:
        """The states entering block `prefix.layer` of every row (n x T x d float32): the
        cached entry when a valid one exists, else computed, stored and returned."""
        ids = _int64(input_ids)
        mask = _int64(attention_mask)
        key = entry_key(prefix, ids, mask)
        name = _digest(key)
        hidden = int(prefix.model.get_input_embeddings().weight.shape[1])
        shape = (ids.shape[0], ids.shape[1], hidden)
        found = self._read(name, key, shape)
        if found is not None:
            self.stats.hits += 1
            return found
        self.stats.misses += 1
        return self._build(prefix, name, key, ids, mask, shape)

    # -- reading

    def _read(self, name: str, key: dict[str, Any], shape: tuple[int, ...]
              ) -> np.ndarray | None:
        index = self.root / f"{name}.json"
        try:
            meta = json.loads(index.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return self._reject(index, "unreadable index")
        try:
            data_path = self.root / str(meta["data"])
            ok = (meta.get("key") == key and tuple(meta["shape"]) == shape
                  and meta["dtype"] == np.dtype(DTYPE).str and "/" not in str(meta["data"]))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            return self._reject(index, "index does not match the request")
        try:
            array = np.load(data_path, mmap_mode="r")
            stat = os.stat(data_path)
        except (OSError, ValueError):
            return self._reject(index, "data file missing or unreadable")
        if array.shape != shape or array.dtype != DTYPE:
            return self._reject(index, "data file has another shape or dtype")
        stamp = (str(data_path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp not in self._verified:
            if _sha256(array) != meta.get("sha256"):
                return self._reject(index, "checksum mismatch")
            self._verified.add(stamp)
        try:
            _touch(index)  # most recently used
        except OSError:
            pass  # evicted meanwhile: the mapping stays valid, the next read rebuilds
        return array

    def _reject(self, index: Path, why: str) -> None:
        log.warning("prefix cache: rebuilding %s (%s)", index.stem, why)
        self.stats.rebuilt += 1
        return None

    # -- writing

    def _build(self, prefix: FrozenPrefix, name: str, key: dict[str, Any], ids: np.ndarray,
               mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        size = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
        if size > self.max_bytes:
            # Still trains from the states (this round gains), but they are not kept.
            self.stats.too_large += 1
            log.warning("prefix cache: an entry of %.2f GB exceeds runtime.prefix_cache_gb "
                        "(%.2f GB); computed in memory, not stored", size / 1e9,
                        self.max_bytes / 1e9)
            out = np.empty(shape, dtype=DTYPE)
            _fill(prefix, ids, mask, out)
            return out
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=self.root)
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=shape)
            _fill(prefix, ids, mask, out)
            out.flush()
            sha = _sha256(out)
            del out
            data_name = f"{name}.{sha[:16]}.npy"
            os.replace(tmp, self.root / data_name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"format": FORMAT, "key": key, "data": data_name, "shape": list(shape),
                "dtype": np.dtype(DTYPE).str, "sha256": sha}
        write_atomic(self.root / f"{name}.json", json.dumps(meta).encode())
        _touch(self.root / f"{name}.json")
        self._evict(keep=name)
        array = np.load(self.root / data_name, mmap_mode="r")
        stat = os.stat(self.root / data_name)
        self._verified.add((str(self.root / data_name), stat.st_ino, stat.st_size,
                            stat.st_mtime_ns))
        return array

    def _evict(self, keep: str) -> None:
        """Remove least recently used entries until the folder fits the bound; also the
        leftovers of writers that died."""
        now = time.time()
        entries: list[tuple[float, Path, str | None]] = []
        referenced: set[str] = set()
        for index in self.root.glob("*.json"):
            try:
                mtime = index.stat().st_mtime
                data = json.loads(index.read_text()).get("data")
            except (OSError, ValueError, AttributeError):
                data, mtime = None, 0.0
            data = data if isinstance(data, str) and "/" not in data else None
            if data:
                referenced.add(data)
            entries.append((mtime, index, data))
        total = 0
        for path in self.root.iterdir():
            try:
                stat = path.stat()
            except OSError:
                continue
            stale = now - stat.st_mtime > STALE_S
            orphan = path.suffix == ".npy" and path.name not in referenced
            if stale and (path.name.startswith(".tmp-") or orphan):
                path.unlink(missing_ok=True)
                continue
            total += stat.st_size
        for _mtime, index, data in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if index.stem == keep:
                continue
            for path in (index, self.root / data if data else None):
                if path is None:
                    continue
                try:
                    total -= path.stat().st_size
                    path.unlink()
                except OSError:
                    pass
            self.stats.evicted += 1


def entry_key(prefix: FrozenPrefix, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Everything the states of rows `ids`/`mask` depend on."""
    rows = hashlib.sha256()
    rows.update(str((ids.shape, mask.shape)).encode())
    rows.update(np.ascontiguousarray(ids).tobytes())
    rows.update(np.ascontiguousarray(mask).tobytes())
    return {"format": FORMAT, **prefix.key(), "max_length": int(ids.shape[1]),
            "rows": rows.hexdigest(), "dtype": np.dtype(DTYPE).str}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _int64(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.int64)


def _sha256(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    flat = array.reshape(-1)
    step = 1 << 22  # elements per chunk: hashes a memory map without loading it whole
    for start in range(0, flat.shape[0], step):
        digest.update(np.ascontiguousarray(flat[start:start + step]).tobytes())
    return digest.hexdigest()


def _fill(prefix: FrozenPrefix, ids: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    device = prefix.model.get_input_embeddings().weight.device
    for start in range(0, ids.shape[0], FILL_BATCH):
        stop = min(start + FILL_BATCH, ids.shape[0])
        batch_ids = torch.from_numpy(ids[start:stop]).to(device)
        batch_mask = torch.from_numpy(mask[start:stop]).to(device)
        out[start:stop] = prefix.states(batch_ids, batch_mask).float().cpu().numpy()


def _touch(path: Path) -> None:
    # An explicit nanosecond clock: the file system's own timestamps are coarse (a few ms
    # here), and two entries used within one tick would tie in the LRU order.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


_CACHES: dict[tuple[str, int], PrefixCache] = {}


def process_cache(cfg: ExperimentConfig) -> PrefixCache:
    """This process's cache for `cfg`'s runtime settings (one object per folder and bound,
    so its checksum memo serves every client the process trains)."""
    settings = runtime_settings(cfg)
    key = (str(settings.cache_dir / "prefix"), settings.prefix_cache_bytes)
    if key not in _CACHES:
        _CACHES[key] = PrefixCache(*key)
    return _CACHES[key]


class CachedForward(TunedModel):
    """`tuned` fed from cached states: `forward(rows, mask)` gathers the states of rows
    `rows` and runs `tuned.forward_from`. It owns no tensor of its own: Opacus wraps it in
    place of `tuned` and sees exactly `tuned`'s trainable modules."""

    def __init__(self, tuned: TunedModel, states: np.ndarray) -> None:
        super().__init__()
        self.tuned = tuned
        self.method = tuned.method
        self._states = states  # a plain attribute: never a buffer, never moved or saved

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.tuned.trainable_state()

    def param_groups(self, lr: float) -> list[dict]:
        return self.tuned.param_groups(lr)

    def forward(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        index = rows.detach().cpu().numpy()
        hidden = torch.from_numpy(np.ascontiguousarray(self._states[index]))
        return self.tuned.forward_from(hidden.to(attention_mask.device), attention_mask)


def training_view(model: TunedModel, data: TensorDataset, cfg: ExperimentConfig
                  ) -> tuple[TunedModel, TensorDataset] | None:
    """`model` and `data` (input ids, mask, labels) as a cached-prefix pair: the model
    reads the states of row i for an input i, and the dataset holds row indices in place of
    token ids, so batching and Poisson sampling pick the same examples as before. None
    when the cache does not apply."""
    if not cache_applies(cfg, model):
        return None
    ids, mask, labels = data.tensors
    assert model.prefix is not None  # cache_applies checked it
    states = process_cache(cfg).states(model.prefix, ids, mask)
    rows = torch.arange(len(labels), dtype=torch.int64)
    return CachedForward(model, states).to(model_device(model)), TensorDataset(rows, mask,
                                                                               labels)

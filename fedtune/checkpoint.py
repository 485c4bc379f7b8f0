"""The server's state after a round, in one file written atomically.

`checkpoint.safetensors` in the run folder holds everything the next round depends on: the
global trainable vector, each client's DP history (so privacy spend survives a restart), the
per-client epsilons reported so far, the process RNG states, and the round's ledger record.
It is written before that record is appended to `rounds.jsonl`, so after a kill at any
point the ledger is at most one round behind the checkpoint and `--resume` can complete it.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedtune.privacy import DPHistory

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedtune-checkpoint/1"


class CheckpointError(ValueError):
    """A run folder cannot be resumed from its checkpoint."""


@dataclass
class ServerState:
    """What the server carries from one round to the next."""

    round: int
    vector: np.ndarray
    spec_hash: str
    initial: dict[str, float]
    client_eps: dict[int, float] = field(default_factory=dict)
    client_dp: dict[int, DPHistory] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    user_releases: int = 0
    # Set when a privacy budget stopped the run: {"before_round": r, "reason": "..."}.
    stopped: dict[str, Any] | None = None


def save_checkpoint(folder: Path, state: ServerState) -> None:
    np_state = np.random.get_state()
    meta = {
        "format": FORMAT,
        "round": state.round,
        "spec_hash": state.spec_hash,
        "initial": state.initial,
        "client_eps": {str(k): v for k, v in state.client_eps.items()},
        "client_dp": {str(k): h.to_lists() for k, h in state.client_dp.items()},
        "record": state.record,
        "resumed_at": state.resumed_at,
        "elapsed_s": state.elapsed_s,
        "user_releases": state.user_releases,
        "stopped": state.stopped,
        "python_rng": random.getstate(),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {
        "vector": torch.from_numpy(np.ascontiguousarray(state.vector, dtype=np.float32)),
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
    }
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=CHECKPOINT_FILE, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fedtune": json.dumps(meta)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, folder / CHECKPOINT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut, not only the data
    finally:
        os.close(dir_fd)


def load_checkpoint(folder: Path, spec_hash: str) -> ServerState:
    """The state saved after the last completed round; restores the process RNG states."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CHECKPOINT_FILE}: no round finished before "
                              "the run stopped; start it again instead of resuming")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["fedtune"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    except (KeyError, ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable fedtune checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT}")
    if meta["spec_hash"] != spec_hash:
        raise CheckpointError(
            f"{path} was written for spec {meta['spec_hash']}, but {folder}/config.toml "
            f"builds spec {spec_hash}: the checkpoint and the config do not belong together")
    torch.random.set_rng_state(tensors["torch_rng"])
    kind, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((kind, tensors["numpy_rng_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, cached))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return ServerState(
        round=int(meta["round"]),
        vector=tensors["vector"].numpy().copy(),
        spec_hash=meta["spec_hash"],
        initial=meta["initial"],
        client_eps={int(k): float(v) for k, v in meta["client_eps"].items()},
        client_dp={int(k): DPHistory.from_lists(v) for k, v in meta["client_dp"].items()},
        record=meta["record"],
        resumed_at=list(meta["resumed_at"]),
        elapsed_s=float(meta["elapsed_s"]),
        user_releases=int(meta["user_releases"]),
        stopped=meta["stopped"],
    )

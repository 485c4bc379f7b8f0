"""The server's state after a round, in one file written atomically.

`checkpoint.safetensors` in the run folder holds everything the next round depends on: the
global trainable vector, each client's DP history as the server charged it (so privacy
spend survives a restart), the per-client epsilons, the privacy parameters the run was
accounted under (`privacy_fingerprint`: a resume with other ones is refused), the process
RNG states, and the round's ledger record. It is written before that record is appended to
`rounds.jsonl`, so after a kill at any point the ledger is at most one round behind the
checkpoint and `--resume` can complete it.

The first checkpoint (round 0: the initial vector, the privacy fingerprint, no histories)
is written before round 1 is charged or sent, so a run killed in round 1 is resumable too.

`privacy_pending.json` holds the DP charges of the round whose instructions were sent last
(written and fsynced before they are sent): if the run is killed in that round, its clients
may have released updates already, and a resume with secret noise charges them (see
`strategies.privacy_ledger`). Both files go through `fedtune.run.atomic` (temp file, fsync,
rename, fsync of the folder).

The process RNG states (python, numpy, torch) are saved so that a resumed run continues
the same draws for what is not DP randomness (initialisation, evaluation order, fault
injection). No DP draw depends on them: DP noise and sampling come from
`fedtune.privacy.randomness`, whose secret generators are never stored here.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes  # the file's bytes, no write

from fedtune.config import ExperimentConfig
from fedtune.privacy import DPHistory
from fedtune.run.atomic import write_atomic
from fedtune.run.folder import CHECKPOINT_FILE, PENDING_FILE

# /2: histories are the server's own charges, and the privacy fingerprint is stored.
FORMAT = "fedtune-checkpoint/2"


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
    # privacy_fingerprint(cfg) of the config this run is accounted under.
    privacy: dict[str, Any] = field(default_factory=dict)
    # Charges applied on a resume for a round that was sent but never completed.
    interrupted: list[dict[str, Any]] = field(default_factory=list)
    # Set when a privacy budget stopped the run: {"before_round": r, "reason": "..."}.
    stopped: dict[str, Any] | None = None
    # Partition id -> the example count the server plans and weights it by, fixed when it
    # was first admitted at a discovery: a resume's discovery keeps it (issue 29, FIX29L).
    examples: dict[int, int] = field(default_factory=dict)


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
        "privacy": state.privacy,
        "interrupted": state.interrupted,
        "examples": {str(k): v for k, v in state.examples.items()},
        "python_rng": random.getstate(),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {
        "vector": torch.from_numpy(np.ascontiguousarray(state.vector, dtype=np.float32)),
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
    }
    # The bytes save_file would write, through the atomic writer's own descriptor: no
    # library is handed a temp name that could be swapped for a link.
    write_atomic(folder / CHECKPOINT_FILE,
                 safetensors_bytes(tensors, metadata={"fedtune": json.dumps(meta)}))


# Every config value a privacy mechanism reads, by mechanism: the one table the privacy
# fingerprint is built from. A dotted key names one value or a whole section. Each mechanism
# is traced on a recording config (tests/test_checkpoint.py): reading a value outside this
# table fails that test, so a new parameter cannot be left out of the resume check.
PRIVACY_PARAMETERS: dict[str, tuple[str, ...]] = {
    # fedtune.privacy.plan (planned_release, local_steps), fedtune.privacy.dpsgd,
    # clients.train: the noise is calibrated over the planned rounds and steps.
    "dp_sgd": ("privacy.sample", "privacy.reproducible_noise", "train.rounds",
               "train.local_steps", "train.local_epochs", "train.batch_size"),
    # fedtune.split.plan (smashed_plan, smashed_privacy_events), fedtune.split.smashed_dp:
    # the share of split steps sets the steps the smashed noise is calibrated over.
    "smashed_dp": ("split.enabled", "split.local_loss_fraction", "split.smashed_dp"),
    # strategies.privacy_ledger (noise calibration, budget stop), strategies.user_dp.
    "user_level": ("privacy", "train.clients_per_round", "train.rounds", "data.num_clients"),
    # Strategy plugins: pruning changes the example count a client trains on (q and
    # sigma), cohort plugins who is asked to train.
    "plugins": ("plugins",),
    # What decides which examples each client holds (a history describes its own
    # partition); the seed also fixes every DP draw in reproducible-noise mode.
    "partitions": ("data", "seed"),
}


def privacy_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every config value a run's privacy accounting depends on (`PRIVACY_PARAMETERS`), by
    dotted key, as the checkpoint stores it. Past releases were accounted under these; a
    resume must not change them."""
    everything = _flatten(json.loads(json.dumps(asdict(cfg), default=str)))
    prefixes = [p for keys in PRIVACY_PARAMETERS.values() for p in keys]
    return {key: value for key, value in everything.items()
            if any(key == p or key.startswith(p + ".") for p in prefixes)}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_privacy(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    if not saved:
        raise CheckpointError(f"{path} records no privacy parameters, so a resume cannot "
                              "check them; start the run again")
    keys = sorted(set(saved) | set(now))
    changed = [f"{k} ({saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r})"
               for k in keys if saved.get(k) != now.get(k)]
    if changed:
        raise CheckpointError(
            f"refusing to resume {path.parent}: the run's past releases were accounted under "
            f"other privacy parameters; changed: {', '.join(changed)}")


def load_checkpoint(folder: Path, spec_hash: str, privacy: dict[str, Any] | None = None
                    ) -> ServerState:
    """The state saved after the last completed round; restores the process RNG states.
    With `privacy` (`privacy_fingerprint` of the config to resume with), refuses a config
    whose privacy parameters differ from those the checkpoint was accounted under."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        if (folder / PENDING_FILE).is_file():  # an older fedtune: no round-0 checkpoint
            raise CheckpointError(
                f"{folder} has no {CHECKPOINT_FILE} but DP charges in {PENDING_FILE}: start "
                f"the run again in a new --out folder holding a copy of that file, so the "
                "new run charges them (fedtune sweep does this itself)")
        raise CheckpointError(f"{folder} has no {CHECKPOINT_FILE}: the run stopped before "
                              "it started; start it again instead of resuming")
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
    if privacy is not None:
        _check_privacy(path, meta.get("privacy"), privacy)
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
        privacy=meta["privacy"],
        interrupted=list(meta["interrupted"]),
        # An older checkpoint has none: the resume's discovery fixes them.
        examples={int(k): int(v) for k, v in meta.get("examples", {}).items()},
    )


def save_pending(folder: Path, pending: dict[str, Any]) -> None:
    """Write the DP charges of the round about to be sent, durably, before it is sent."""
    write_atomic(folder / PENDING_FILE, json.dumps(pending).encode())


def load_pending(folder: Path) -> dict[str, Any] | None:
    """The charges of the last round sent, or None if none was recorded."""
    path = folder / PENDING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None

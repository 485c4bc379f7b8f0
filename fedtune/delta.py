"""The wire format of trainable state: one flat vector described by a `DeltaSpec`.

Both directions carry exactly one array: the server sends the global trainable vector, a
client replies with `local - global`. The spec hash binds a vector to the tensor layout, the
frozen backbone and the method config, so a vector made for another model is rejected
instead of being averaged into nonsense.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array

STYPE = "fedtune.flat"
WIRE_DTYPES = ("float32",)


class DeltaError(ValueError):
    """A received vector does not match the spec or holds non-finite values."""


@dataclass(frozen=True)
class DeltaSpec:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    backbone_hash: str
    method_hash: str

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], backbone_hash: str,
                   method_config: Mapping[str, object]) -> DeltaSpec:
        method_hash = hashlib.sha256(
            json.dumps(dict(method_config), sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        return cls(
            names=tuple(state),
            shapes=tuple(tuple(t.shape) for t in state.values()),
            dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in state.values()),
            backbone_hash=backbone_hash,
            method_hash=method_hash,
        )

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def hash(self) -> str:
        payload = json.dumps([self.names, self.shapes, self.dtypes, self.backbone_hash,
                              self.method_hash])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # -- flat <-> named tensors

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        if tuple(state) != self.names:
            raise DeltaError(f"state tensors {list(state)} do not match spec {list(self.names)}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise DeltaError(f"tensor {name!r} has shape {tuple(tensor.shape)}, spec {shape}")
            parts.append(tensor.detach().float().cpu().reshape(-1).numpy())
        return np.concatenate(parts).astype(np.float32, copy=False)

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        self.check_vector(flat)
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape))
            out[name] = torch.from_numpy(np.array(flat[offset:offset + n])).reshape(shape)
            offset += n
        return out

    def check_vector(self, flat: np.ndarray) -> None:
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise DeltaError(f"vector has shape {flat.shape}, spec expects ({self.size},)")
        if not np.isfinite(flat).all():
            bad = int((~np.isfinite(flat)).sum())
            raise DeltaError(f"vector holds {bad} non-finite values (NaN or inf)")


def encode(flat: np.ndarray) -> Array:
    """A flat float32 vector as a Flower Array whose payload is exactly the raw bytes, so
    the bytes counted on a Message are the bytes of the encoded vector."""
    flat = np.ascontiguousarray(flat, dtype=np.float32)
    return Array(dtype="float32", shape=(int(flat.shape[0]),), stype=STYPE, data=flat.tobytes())


def decode(array: Array, spec: DeltaSpec) -> np.ndarray:
    """Check an Array against `spec` and return the vector; raises `DeltaError` naming the
    first thing wrong."""
    if array.stype != STYPE:
        raise DeltaError(f"array serialisation {array.stype!r}, expected {STYPE!r}")
    if array.dtype not in WIRE_DTYPES:
        raise DeltaError(f"array dtype {array.dtype!r}, expected one of {WIRE_DTYPES}")
    if tuple(array.shape) != (spec.size,):
        raise DeltaError(f"array shape {tuple(array.shape)}, spec expects ({spec.size},)")
    expected = spec.size * np.dtype(array.dtype).itemsize
    if len(array.data) != expected:
        raise DeltaError(f"array holds {len(array.data)} bytes, expected {expected}")
    flat = np.frombuffer(array.data, dtype=array.dtype).astype(np.float32)
    spec.check_vector(flat)
    return flat


def array_bytes(record_dict: object) -> int:
    """Bytes of all array payloads in a Message's RecordDict (what crosses the wire for
    arrays; configs and metrics are a few hundred bytes and counted apart)."""
    total = 0
    for record in record_dict.array_records.values():  # type: ignore[attr-defined]
        for array in record.values():
            total += len(array.data)
    return total

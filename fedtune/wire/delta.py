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
FLOAT16_MAX = float(np.finfo(np.float16).max)


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


@dataclass(frozen=True)
class Encoding:
    """How a float32 vector is written into an Array payload."""

    stype: str
    dtype: str

    def payload_bytes(self, spec_size: int, num_tensors: int) -> int:
        if self.dtype == "int8":
            return 4 * num_tensors + spec_size  # float32 scale per tensor, then int8 values
        return spec_size * np.dtype(self.dtype).itemsize


ENCODINGS = {
    "float32": Encoding(STYPE, "float32"),
    "float16": Encoding(STYPE + "/float16", "float16"),
    "int8": Encoding(STYPE + "/int8-per-tensor", "int8"),
}


def encode(flat: np.ndarray, encoding: str = "float32", spec: DeltaSpec | None = None
           ) -> Array:
    """A flat float32 vector as a Flower Array whose payload is exactly the encoded bytes,
    so the bytes counted on a Message are the bytes of the encoded vector.

    float32 is exact; float16 rounds each value; int8 stores one float32 scale per tensor
    of `spec` (max |x| / 127) followed by the rounded int8 values. A lossy encoding refuses
    values it cannot represent (non-finite, or beyond float16's range) rather than send
    something else; float32 sends anything, and the receiver's decode judges it."""
    if encoding not in ENCODINGS:
        raise DeltaError(f"encoding {encoding!r} is not one of: {', '.join(ENCODINGS)}")
    enc = ENCODINGS[encoding]
    flat = np.ascontiguousarray(flat, dtype=np.float32)
    if enc.dtype != "float32" and not np.isfinite(flat).all():
        raise DeltaError(f"{encoding} cannot encode non-finite values; "
                         "only float32 carries them (to be rejected on arrival)")
    if enc.dtype == "float16" and flat.size and float(np.abs(flat).max()) > FLOAT16_MAX:
        raise DeltaError(f"a value of {float(np.abs(flat).max()):.4g} exceeds float16's range "
                         f"({FLOAT16_MAX:g}); use delta.encoding=float32 or int8")
    if enc.dtype == "int8":
        if spec is None:
            raise DeltaError("int8 encoding needs the DeltaSpec for its per-tensor scales")
        scales, parts = [], []
        for seg in _segments(flat, spec):
            peak = float(np.abs(seg).max()) if seg.size else 0.0
            scale = np.float32(peak / 127.0 if peak > 0 else 1.0)
            if float(scale) * 127.0 > float(np.finfo(np.float32).max):
                # Near float32's max, 127 x scale rounds up to inf; one ulp less decodes.
                scale = np.nextafter(scale, np.float32(0))
            scales.append(scale)
            parts.append(np.clip(np.rint(seg / scale), -127, 127).astype(np.int8))
        data = np.asarray(scales, np.float32).tobytes() + np.concatenate(parts).tobytes()
    else:
        data = flat.astype(enc.dtype).tobytes()
    return Array(dtype=enc.dtype, shape=(int(flat.shape[0]),), stype=enc.stype, data=data)


def decode(array: Array, spec: DeltaSpec) -> np.ndarray:
    """Check an Array against `spec` and return the float32 vector; raises `DeltaError`
    naming the first thing wrong."""
    enc = next((e for e in ENCODINGS.values() if e.stype == array.stype), None)
    if enc is None:
        raise DeltaError(f"array serialisation {array.stype!r}, expected one of "
                         f"{[e.stype for e in ENCODINGS.values()]}")
    if array.dtype != enc.dtype:
        raise DeltaError(f"array dtype {array.dtype!r}, expected {enc.dtype!r} for "
                         f"{array.stype!r}")
    if tuple(array.shape) != (spec.size,):
        raise DeltaError(f"array shape {tuple(array.shape)}, spec expects ({spec.size},)")
    expected = enc.payload_bytes(spec.size, len(spec.names))
    if len(array.data) != expected:
        raise DeltaError(f"array holds {len(array.data)} bytes, expected {expected}")
    if enc.dtype == "int8":
        head = 4 * len(spec.names)
        scales = np.frombuffer(array.data[:head], dtype=np.float32)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise DeltaError("int8 payload has non-finite or non-positive tensor scales")
        values = np.frombuffer(array.data[head:], dtype=np.int8).astype(np.float32)
        with np.errstate(over="ignore"):  # an overflow becomes inf, rejected just below
            flat = np.concatenate([seg * scale for seg, scale in
                                   zip(_segments(values, spec), scales, strict=True)])
    else:
        flat = np.frombuffer(array.data, dtype=enc.dtype).astype(np.float32)
    spec.check_vector(flat)
    return flat


def _segments(flat: np.ndarray, spec: DeltaSpec) -> list[np.ndarray]:
    bounds = np.cumsum([0] + [int(np.prod(s)) for s in spec.shapes])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def array_bytes(record_dict: object) -> int:
    """Bytes of all array payloads in a Message's RecordDict (what crosses the wire for
    arrays; configs and metrics are a few hundred bytes and counted apart)."""
    total = 0
    for record in record_dict.array_records.values():  # type: ignore[attr-defined]
        for array in record.values():
            total += len(array.data)
    return total


def clip_to_norm(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    """`delta` scaled down to L2 norm `clip_norm` if longer (Flower's flat clipping); the
    norm is computed in float64 and the scale rounded down so the float32 result never
    exceeds the bound."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm <= clip_norm:
        return delta
    scale = np.nextafter(np.float32(clip_norm / norm), np.float32(0))
    return (delta * scale).astype(np.float32)

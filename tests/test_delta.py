import numpy as np
import pytest
import torch
from flwr.app import Array

from fedtune.wire.delta import STYPE, DeltaError, DeltaSpec, decode, encode


def _state():
    g = torch.Generator().manual_seed(0)
    return {"prompt.embedding.weight": torch.randn(4, 3, generator=g),
            "head.net.0.weight": torch.randn(2, 3, generator=g),
            "head.net.0.bias": torch.randn(2, generator=g)}


def _spec(backbone="b1", method=None):
    return DeltaSpec.from_state(_state(), backbone, method or {"method": "prompt"})


def test_flatten_unflatten_round_trip_is_exact():
    spec, state = _spec(), _state()
    flat = spec.flatten(state)
    assert flat.dtype == np.float32 and flat.shape == (spec.size,) == (4 * 3 + 2 * 3 + 2,)
    back = spec.unflatten(flat)
    assert list(back) == list(state)
    for name in state:
        assert torch.equal(back[name], state[name])


def test_encoded_bytes_are_exactly_the_vector():
    spec = _spec()
    flat = spec.flatten(_state())
    array = encode(flat)
    assert len(array.data) == 4 * spec.size
    assert np.array_equal(decode(array, spec), flat)


def test_spec_hash_binds_backbone_method_and_layout():
    assert _spec().hash == _spec().hash
    assert _spec("b2").hash != _spec().hash
    assert _spec(method={"method": "prompt", "prompt_length": 5}).hash != _spec().hash


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (Array(dtype="float32", shape=(5,), stype=STYPE, data=np.zeros(5, np.float32).tobytes()),
         "shape (5,)"),
        (Array(dtype="float64", shape=(20,), stype=STYPE, data=np.zeros(20).tobytes()),
         "dtype 'float64', expected 'float32'"),
        (Array.from_numpy_ndarray(np.zeros(20, np.float32)), "serialisation"),
        (Array(dtype="float32", shape=(20,), stype=STYPE,
               data=np.array([np.nan] + [0] * 19, np.float32).tobytes()), "non-finite"),
        (Array(dtype="float32", shape=(20,), stype=STYPE,
               data=np.array([np.inf] * 20, np.float32).tobytes()), "20 non-finite"),
        (Array(dtype="float32", shape=(20,), stype=STYPE, data=b"\0" * 12), "holds 12 bytes"),
    ],
)
def test_malformed_vectors_are_rejected_with_a_reason(array, needle):
    with pytest.raises(DeltaError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        decode(array, _spec())


def test_flatten_rejects_wrong_layout():
    spec, state = _spec(), _state()
    state["head.net.0.bias"] = torch.zeros(3)
    with pytest.raises(DeltaError, match="has shape"):
        spec.flatten(state)
    with pytest.raises(DeltaError, match="do not match spec"):
        spec.flatten(dict(reversed(list(_state().items()))))


@pytest.mark.parametrize(("encoding", "bytes_per_value", "tolerance"),
                         [("float32", 4, 0.0), ("float16", 2, 1e-3), ("int8", 1, 1 / 127)])
def test_encodings_round_trip_within_bounds(encoding, bytes_per_value, tolerance):
    spec = _spec()
    flat = spec.flatten(_state())
    array = encode(flat, encoding, spec)
    overhead = 4 * len(spec.names) if encoding == "int8" else 0
    assert len(array.data) == bytes_per_value * spec.size + overhead
    back = decode(array, spec)
    if encoding == "float32":
        assert np.array_equal(back, flat)
    else:
        # Bounded error: relative for float16, half a quantisation step per tensor for int8.
        for seg_back, seg in zip(_split(back, spec), _split(flat, spec), strict=True):
            bound = tolerance * (np.abs(seg) if encoding == "float16" else np.abs(seg).max())
            assert np.all(np.abs(seg_back - seg) <= bound + 1e-7)


def _split(flat, spec):
    out, offset = [], 0
    for shape in spec.shapes:
        n = int(np.prod(shape))
        out.append(flat[offset:offset + n])
        offset += n
    return out


def test_int8_rejects_bad_scales_and_needs_a_spec():
    spec = _spec()
    array = encode(spec.flatten(_state()), "int8", spec)
    bad = bytearray(array.data)
    bad[0:4] = np.float32(np.nan).tobytes()
    tampered = Array(dtype="int8", shape=array.shape, stype=array.stype, data=bytes(bad))
    with pytest.raises(DeltaError, match="non-finite or non-positive tensor scales"):
        decode(tampered, spec)
    with pytest.raises(DeltaError, match="needs the DeltaSpec"):
        encode(np.zeros(3, np.float32), "int8")
    with pytest.raises(DeltaError, match="encoding 'int4' is not one of"):
        encode(np.zeros(3, np.float32), "int4")

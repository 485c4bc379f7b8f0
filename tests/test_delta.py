import numpy as np
import pytest
import torch
from flwr.app import Array

from fedtune.delta import STYPE, DeltaError, DeltaSpec, decode, encode


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
         "dtype 'float64'"),
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

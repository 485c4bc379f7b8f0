"""Hostile input, generated: whatever a config file, an override or a client's reply holds,
the loader and the decoder either accept it or raise their own one-line error, never
anything else."""

import numpy as np
import pytest
import torch
from flwr.app import Array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_from_toml,
    parse_override,
)
from fedtune.wire.delta import ENCODINGS, DeltaError, DeltaSpec, decode, encode

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
DEFAULTS = ExperimentConfig().to_dict()
SECTIONS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, dict))

toml_scalars = (st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=20) | st.booleans())
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)


def _one_line_config_error(fn, *args):
    try:
        return fn(*args)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return None


@st.composite
def mutated_configs(draw):
    """The defaults with a few keys set to arbitrary values: existing keys (type and range
    errors), new keys (unknown-key errors) and whole sections replaced."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in DEFAULTS.items()}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(SECTIONS))
        if not isinstance(raw.get(section), dict) or draw(st.integers(0, 9)) == 0:
            raw[section] = draw(toml_values)
            continue
        keys = sorted(DEFAULTS[section]) + ["bogus"]
        raw[section][draw(st.sampled_from(keys))] = draw(toml_values)
    return raw


@FUZZ
@given(mutated_configs())
def test_config_loader_accepts_or_names_the_problem(raw):
    cfg = _one_line_config_error(config_from_dict, raw)
    if cfg is not None:
        assert isinstance(cfg, ExperimentConfig)
        cfg.validate()


@FUZZ
@given(st.text(max_size=200))
def test_config_text_is_toml_or_a_clear_error(text):
    _one_line_config_error(config_from_toml, text)


@FUZZ
@given(st.text(max_size=60))
def test_overrides_parse_or_say_why(item):
    parsed = _one_line_config_error(parse_override, item)
    if parsed is not None:
        key, _ = parsed
        assert key and key == key.strip()


SPEC = DeltaSpec.from_state({"a": torch.zeros(3, 2), "b": torch.zeros(5)}, "bb", {"m": 1})
STYPES = [e.stype for e in ENCODINGS.values()] + ["numpy.ndarray", ""]
DTYPES = ["float32", "float16", "int8", "float64", "int64", "bool", ""]


@FUZZ
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, 20), max_size=3),
       st.sampled_from(STYPES), st.binary(max_size=64))
def test_decoder_rejects_any_malformed_array_with_a_delta_error(dtype, shape, stype, data):
    array = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
    try:
        flat = decode(array, SPEC)
    except DeltaError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert flat.dtype == np.float32 and flat.shape == (SPEC.size,)
    assert np.isfinite(flat).all()


@FUZZ
@given(st.sampled_from(sorted(ENCODINGS)),
       st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                min_size=SPEC.size, max_size=SPEC.size))
def test_non_finite_values_never_decode(encoding, values):
    vector = np.asarray(values, dtype=np.float32)
    try:
        array = encode(vector, encoding, SPEC)
    except DeltaError as exc:
        # Only the lossy encodings refuse, and only what they cannot represent.
        assert encoding != "float32", exc
        assert not np.isfinite(vector).all() or np.abs(vector).max() > 65504, exc
        return
    try:
        flat = decode(array, SPEC)
    except DeltaError:
        assert not np.isfinite(vector).all()
        return
    assert np.isfinite(flat).all()
    if encoding == "float32":
        np.testing.assert_array_equal(flat, vector)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_truncated_payloads_are_rejected(encoding):
    array = encode(np.ones(SPEC.size, np.float32), encoding, SPEC)
    cut = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-1])
    with pytest.raises(DeltaError, match="bytes, expected"):
        decode(cut, SPEC)


@FUZZ
@given(mutated_configs())
def test_every_accepted_config_holds_only_finite_numbers(raw):
    import math

    cfg = _one_line_config_error(config_from_dict, raw)
    if cfg is None:
        return

    def numbers(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from numbers(item)
        elif isinstance(value, list):
            for item in value:
                yield from numbers(item)
        elif isinstance(value, float):
            yield value

    assert all(math.isfinite(x) for x in numbers(cfg.to_dict()))
    assert 0 <= cfg.seed < 2**32


# --- files a user hands fedtune: their bytes are read or refused in one line --------------

FILES = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow,
                                        HealthCheck.function_scoped_fixture])
file_bytes = (st.binary(max_size=300)
              | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
              | st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]),
                                         st.text(max_size=5) | st.integers(-2, 3),
                                         max_size=3), max_size=4).map(
                  lambda rows: "\n".join(map(__import__("json").dumps, rows)).encode()))


def _one_line(error_type, fn, *args):
    try:
        return fn(*args)
    except error_type as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return None


@FILES
@given(data=file_bytes, suffix=st.sampled_from([".jsonl", ".txt", ".bin"]))
def test_predict_input_is_read_or_refused_in_one_line(tmp_path, data, suffix):
    from fedtune.data.predict_input import PredictInputError, read_texts

    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    got = _one_line(PredictInputError, read_texts, path, ("ham", "spam"))
    if got is not None:
        texts, labels = got
        assert texts and all(isinstance(t, str) and "\0" not in t for t in texts)
        assert labels is None or (len(labels) == len(texts)
                                  and all(y in (0, 1) for y in labels))


@FILES
@given(data=file_bytes)
def test_ledger_is_read_or_refused_in_one_line(tmp_path, data):
    from fedtune.run.ledger import LedgerError, count_rounds, read_rounds

    (tmp_path / "rounds.jsonl").write_bytes(data)
    records = _one_line(LedgerError, read_rounds, tmp_path)
    if records is not None:
        assert all(isinstance(r, dict) and "round" in r for r in records)
    assert count_rounds(tmp_path) >= 0


@FILES
@given(data=file_bytes, suffix=st.sampled_from([".csv", ".jsonl", ".parquet"]))
def test_data_files_are_checked_or_refused_in_one_line(tmp_path, data, suffix):
    from fedtune.data.text_files import DataFileError, check_text_file

    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    _one_line(DataFileError, check_text_file, path)


# The accountant's input: a history is refused in one line, or its epsilon comes fast.
sigmas = st.sampled_from([1e-200, 5e-324, 0.0, 0.05, 0.1, 0.5, 1.0, 7.0, 1e3, 1e6,
                          float("nan"), float("inf")]) | st.floats(0.09, 1001.0)
rates = st.sampled_from([0.0, 1e-300, 1e-6, 0.5, 1.0, 1.5, float("nan")]) | st.floats(0, 1)
steps = st.sampled_from([0, 1, 10, 10**7, 10**8, 10**9, -1]) | st.integers(1, 1000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(sigmas, rates, steps), min_size=1, max_size=8)
       | st.just([(1.0, 0.5, 1)] * 5000))
def test_any_history_is_refused_in_one_line_or_accounted_fast(entries):
    import time

    from fedtune.privacy import DPHistory, epsilon_of

    started = time.perf_counter()
    try:
        epsilon = epsilon_of(DPHistory(list(entries)), 1e-5, "rdp")
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200, str(exc)
        return
    assert epsilon is not None and epsilon >= 0 and not np.isnan(epsilon)
    assert time.perf_counter() - started < 5.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000) | st.binary(max_size=2000), st.integers(1, 300))
def test_bounded_text_is_short_and_says_it_was_cut(text, limit):
    from fedtune.wire.protocol import bounded

    shown = bounded(text, limit)
    assert len(shown) <= limit + 40
    assert shown == str(text) or "characters)" in shown

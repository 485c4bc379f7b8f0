"""The range and shape rules every config value passes: one-line `ConfigError`s naming the
dotted key and what is allowed (THREATS.md 8). The sections' `validate()` (fedtune.config.schema)
and the method tables (fedtune.config.methods) call these; nothing here knows a section."""

from __future__ import annotations

import math
import typing
from typing import Any

from fedtune.config.errors import ConfigError

# numpy's legacy seeding (np.random.seed, RandomState) takes 32-bit seeds only.
SEED_MAX = 2**32 - 1
# Ranges that fit one machine, checked before any other rule (THREATS.md 8): a value past
# them is a typo or an attack, not an experiment (2^63 rounds, lr 1e308, a delta that is a
# subnormal float). Each refusal names the key and its range. Keys: dotted config paths.
BOUNDS: dict[str, tuple[float, float]] = {
    "model.max_length": (1, 65_536),
    "data.num_clients": (1, 1_000_000),
    "data.target_clients": (0, 1_000_000),
    "train.rounds": (1, 100_000),
    "train.clients_per_round": (1, 1_000_000),
    "aggregation.tolerate": (0, 1_000_000),  # attackers, at most a cohort of them
    "train.local_steps": (1, 1_000_000),
    "train.local_epochs": (0, 10_000),
    "train.batch_size": (1, 65_536),
    "train.eval_batch_size": (1, 65_536),
    "train.eval_max_examples": (0, 1_000_000_000),
    "train.lr": (1e-12, 1e4),
    "train.max_grad_norm": (0, 1e6),
    "train.round_timeout_s": (1e-3, 7 * 86_400),
    "privacy.sample.target_epsilon": (1e-6, 1e4),
    "privacy.sample.noise_multiplier": (0, 1e6),
    "privacy.sample.max_grad_norm": (1e-12, 1e6),
    "privacy.sample.delta": (1e-30, 0.5),
    "privacy.user.target_epsilon": (1e-6, 1e4),
    "privacy.user.noise_multiplier": (0, 1e6),
    "privacy.user.clip_norm": (1e-12, 1e6),
    # A numeric norm bound, the clip norms' range ("adaptive" and "off" are not numbers).
    "aggregation.norm_bound": (1e-12, 1e6),
    "privacy.user.delta": (1e-30, 0.5),
    "faults.hang_s": (1e-3, 7 * 86_400),
    "split.cut_layer": (0, 10_000),
    "split.tail_layers": (0, 10_000),
    "split.smashed_dp.activation_clip_norm": (1e-12, 1e6),
    "split.smashed_dp.gradient_clip_norm": (1e-12, 1e6),
    "split.smashed_dp.target_epsilon": (1e-6, 1e4),
    "split.smashed_dp.noise_multiplier": (0, 1e6),
    "simulation.num_cpus": (0, 65_536),
    "simulation.num_cpus_per_client": (1e-3, 65_536),
    "simulation.num_gpus_per_client": (0, 1_024),
    # A head of 16k hidden units is ~50 MB with a 768-wide backbone; its per-example
    # gradients at a batch of 64 already take gigabytes of a 24 GiB machine.
    "tuning.head_hidden": (0, 16_384),
    # Dirichlet concentration: 1e-6 already puts each client on one label, 1e6 is IID.
    "data.alpha": (1e-6, 1e6),
    # The frozen-prefix cache on disk, in GB: 1 TB is more than any one machine's disk.
    "runtime.prefix_cache_gb": (1e-6, 1_024),
    # Greedy decoding without a KV cache costs prompt + new forwards per text: what a 2-core
    # machine decodes in minutes, not hours.
    "task.generation_examples": (0, 10_000),
    "task.generation_prompt_tokens": (1, 4_096),
    "task.generation_new_tokens": (1, 4_096),
}
# `name` becomes a folder (runs/<name>-<time>): one path component, as a sweep's run names
# (fedtune.study.sweep.check_folder_name), with room for the time stamp.
NAME_MAX_BYTES = 200


def require_finite(key: str, value: float) -> None:
    # inf passes every "> 0" range check and nan fails none of the "not x > 0" ones the
    # same way, so both are refused before any range is looked at.
    try:
        finite = math.isfinite(value)
    except OverflowError:
        # An integer past float's range (400 digits): no float holds it (review ATTACK34).
        finite = False
    if not finite:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"
        raise ConfigError(f"{key} must be a finite number, got {shown}")


def require_choice(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")


def require_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def require_nonnegative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")


def require_nonempty(key: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(f"{key} must not be empty")


def check_name(name: str) -> None:
    """`name` is one safe folder name: it cannot leave the folder it is put in."""
    if (name.strip() in ("", ".", "..") or "/" in name or "\\" in name
            or any(not ch.isprintable() for ch in name)
            or len(name.encode()) > NAME_MAX_BYTES):
        raise ConfigError(f"name={name[:120]!r} must be a single folder name: not empty, '.' "
                          f"or '..', no '/' or '\\', printable, 1-{NAME_MAX_BYTES} bytes")


def check_bounds(cfg: Any) -> None:
    """Every number in `BOUNDS` of `cfg` (an ExperimentConfig: typed Any, as this module
    sits below fedtune.config.schema) within its range (one line naming key and range)."""
    for key, (low, high) in BOUNDS.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        require_in_range(key, value, low, high)


def check_table_bounds(table: Any, prefix: str) -> None:
    """A `[tuning.<method>]` table's numbers within its class's `BOUNDS` (field name ->
    range): the same rule, kept next to the fields it bounds (fedtune.config.methods)."""
    for name, (low, high) in getattr(type(table), "BOUNDS", {}).items():
        require_in_range(f"{prefix}.{name}", getattr(table, name), low, high)


def require_in_range(key: str, value: Any, low: float, high: float) -> None:
    """One line naming the key and its range for a number outside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not low <= value <= high:
        raise ConfigError(f"{key} must be in [{_num(low)}, {_num(high)}], got {value!r}"[:300])


def _num(bound: float) -> str:
    # Short where exact (1e+06), every digit where not (a 32-bit seed's 4294967295).
    short = f"{bound:g}"
    return short if float(short) == bound else str(bound)


def ascii_digits(text: str) -> bool:
    """Whether `text` is a whole number that int() reads: ASCII digits only. str.isdigit()
    also takes "²", on which int() raises (found by test_fuzz in a label, then in a port and
    a peer's Content-Length)."""
    return text.isascii() and text.isdigit()

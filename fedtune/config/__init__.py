"""Typed experiment configuration: TOML in, validated dataclasses, resolved TOML out.

Every field has a default, so a config file only states what differs. Unknown keys, wrong
types and out-of-range values are rejected with a `ConfigError` naming the dotted field and
what is allowed: a typo must never silently fall back to a default.

This package's modules, lowest first (none imports one above it):

- `errors`: ConfigError, DeployError;
- `registry`: the names a config may use (methods, corpora, plugins), looked up by name;
- `checks`: the range and shape rules (BOUNDS, require_*, check_name);
- `pruning`, `runtime`: the layer-pruning rule grammar, the `[runtime]` table and how its
  settings resolve against the environment;
- `user_unit`: who epsilon_user protects (the unit the partition makes), and the refusal
  of a config where one user would be two clients;
- `schema`: one dataclass per table, each with its own `validate()`;
- `methods`: the built-in `[tuning.<method>]` tables (registered as the package loads);
- `load`: TOML and `--set` overrides into a validated ExperimentConfig;
- `flower_run`: the config of a `flwr run` (its run config).

The names below are the public API, imported as `from fedtune.config import X`.
"""

from __future__ import annotations

# Registers the built-in methods' specs as the package loads, before any lookup and before a
# third-party `register_method` (the registry itself never imports it: no cycle).
from fedtune.config import methods as _methods  # noqa: F401
from fedtune.config.checks import (
    BOUNDS,
    NAME_MAX_BYTES,
    SEED_MAX,
    check_bounds,
    check_name,
    check_table_bounds,
    require_choice,
    require_finite,
    require_in_range,
    require_nonempty,
    require_nonnegative,
    require_positive,
)
from fedtune.config.errors import ConfigError
from fedtune.config.load import (
    config_from_dict,
    config_from_toml,
    load_config,
    parse_override,
    read_toml,
)
from fedtune.config.runtime import RuntimeConfig
from fedtune.config.schema import (
    ACCOUNTANTS,
    ADAPTIVE_FACTOR_MAX,
    AGGREGATION_RULES,
    ATTACK_SCALE_MAX,
    CLIENT_WEIGHTING_PLUGINS,
    GRAD_SAMPLE_MODES,
    MOVED_TUNING_KEYS,
    NORM_BOUND_MODES,
    OPTIMIZERS,
    PREFIX_CACHE,
    AggregationConfig,
    AttackSimulationConfig,
    DataConfig,
    DeltaConfig,
    ExperimentConfig,
    FaultConfig,
    ModelConfig,
    PrivacyConfig,
    SampleDPConfig,
    SimulationConfig,
    SmashedDPConfig,
    SplitConfig,
    TrainConfig,
    TuningConfig,
    UserDPConfig,
)
from fedtune.config.task import TaskConfig

__all__ = [
    "ACCOUNTANTS", "ADAPTIVE_FACTOR_MAX", "AGGREGATION_RULES", "ATTACK_SCALE_MAX", "BOUNDS",
    "CLIENT_WEIGHTING_PLUGINS", "GRAD_SAMPLE_MODES", "MOVED_TUNING_KEYS", "NAME_MAX_BYTES",
    "NORM_BOUND_MODES", "OPTIMIZERS", "PREFIX_CACHE", "SEED_MAX",
    "AggregationConfig", "AttackSimulationConfig", "ConfigError", "DataConfig", "DeltaConfig",
    "ExperimentConfig", "FaultConfig", "ModelConfig", "PrivacyConfig", "RuntimeConfig",
    "SampleDPConfig", "SimulationConfig", "SmashedDPConfig", "SplitConfig", "TaskConfig",
    "TrainConfig", "TuningConfig", "UserDPConfig",
    "check_bounds", "check_name", "check_table_bounds", "config_from_dict", "config_from_toml",
    "load_config", "parse_override", "read_toml", "require_choice", "require_finite",
    "require_in_range", "require_nonempty", "require_nonnegative", "require_positive",
]

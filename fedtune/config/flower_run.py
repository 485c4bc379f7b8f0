"""Read the experiment config from Flower's run config (the `flwr run` path).

`pyproject.toml` names the experiment file under `[tool.flwr.app.config]`; `flwr run
--run-config "config='x.toml' overrides='train.rounds=3 seed=1'"` changes both.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping

from fedtune.config.errors import ConfigError
from fedtune.config.load import load_config
from fedtune.config.schema import ExperimentConfig


def config_from_run_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    path = str(run_config.get("config", "experiments/quickstart.toml"))
    overrides = str(run_config.get("overrides", ""))
    return _load(path, overrides)


@functools.lru_cache(maxsize=4)
def _load(path: str, overrides: str) -> ExperimentConfig:
    try:
        items = shlex.split(overrides)
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"run config overrides={overrides!r}: {exc}") from None
    return load_config(path, items)

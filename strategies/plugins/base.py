"""What a strategy plugin can do, and the registry that finds plugins by name.

A plugin is built from its `[[plugins]]` table and the experiment config. The server calls
its hooks each round; every hook has a no-op default, so a plugin overrides only what it
changes:

- `client_config(rnd, pid)`: fields of that client's `fedtune.wire.protocol.TrainInstruction`
  (only `protocol.PLUGIN_FIELDS`: the settings objects a plugin owns);
- `select_cohort(rnd, pids)`: choose the cohort from the sampled partition ids;
- `client_weight(rnd, pid)`: a factor in [0, 1] on that client's delta in the aggregate
  (after user-level clipping, so a client's DP sensitivity never grows);
- `round_extras(rnd, clients)`: fields added to the round's ledger line, from the accepted
  clients' typed reports (`strategies.pipeline.ClientReport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedtune.config import ConfigError

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from strategies.pipeline import ClientReport


class Plugin:
    """A strategy plugin: its params from its `[[plugins]]` table, and the hooks the server
    calls each round (each a no-op here)."""

    name: ClassVar[str] = ""
    # Param name -> (type, default). A param without default (None) is required.
    params: ClassVar[dict[str, tuple[type, Any]]] = {}
    # True when select_cohort changes who takes part; user-level DP accounting assumes
    # Poisson sampling, so such a plugin must account for itself or be refused.
    changes_cohort: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        for key, value in params.items():
            setattr(self, key, value)

    @classmethod
    def check(cls, params: dict[str, Any], cfg: ExperimentConfig, where: str) -> None:
        """Raise ConfigError naming `where.key` for a bad param; override to add rules."""

    def client_config(self, rnd: int, pid: int) -> dict[str, Any]:
        return {}

    def select_cohort(self, rnd: int, pids: list[int]) -> list[int]:
        return pids

    def client_weight(self, rnd: int, pid: int) -> float:
        return 1.0

    def round_extras(self, rnd: int, clients: Sequence[ClientReport]) -> dict[str, Any]:
        return {}

    def report_groups(self) -> tuple[str, ...]:
        """The figure groups (`fedtune.wire.protocol.EXTRA_GROUPS`) this plugin's clients
        report; the server rejects a reply carrying any group no part of the run uses."""
        return ()

    def trained_sizes(self, n: int) -> list[int]:
        """How many examples a client holding `n` may train on in a round under this
        plugin: the server charges its planned DP-SGD release at the costliest of them."""
        return [n]


_PLUGINS: dict[str, type[Plugin]] = {}


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    if not cls.name or cls.name in _PLUGINS:
        raise ValueError(f"plugin name {cls.name!r} is empty or registered twice")
    _PLUGINS[cls.name] = cls
    return cls


def available_plugins() -> list[str]:
    return sorted(_PLUGINS)


def _resolved(index: int, table: dict[str, Any], cfg: ExperimentConfig
              ) -> tuple[type[Plugin], dict[str, Any]]:
    where = f"plugins[{index}]"
    name = table.get("name")
    if name not in _PLUGINS:
        raise ConfigError(f"{where}.name={name!r} is not one of: "
                          f"{', '.join(available_plugins())}")
    cls = _PLUGINS[name]
    unknown = sorted(set(table) - {"name"} - set(cls.params))
    if unknown:
        raise ConfigError(f"{where}: unknown params {unknown} for plugin {name!r}; "
                          f"allowed: {sorted(cls.params)}")
    params = {}
    for key, (kind, default) in cls.params.items():
        value = table.get(key, default)
        if value is None:
            raise ConfigError(f"{where}.{key} is required by plugin {name!r}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be {kind.__name__}, got {value!r}")
        params[key] = value
    cls.check(params, cfg, where)
    if cls.changes_cohort and cfg.privacy.user.enabled:
        raise ConfigError(f"{where}: plugin {name!r} changes the cohort, which the "
                          "user-level DP accounting (Poisson sampling) does not cover")
    return cls, params


def validate_plugins(cfg: ExperimentConfig) -> None:
    for i, table in enumerate(cfg.plugins):
        _resolved(i, table, cfg)


def build_plugins(cfg: ExperimentConfig) -> list[Plugin]:
    built = []
    for i, table in enumerate(cfg.plugins):
        cls, params = _resolved(i, table, cfg)
        built.append(cls(params, cfg))
    return built


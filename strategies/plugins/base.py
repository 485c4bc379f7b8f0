"""What a strategy plugin can do, and the registry that finds plugins by name.

A plugin is built from its `[[plugins]]` table and the experiment config. The server calls
its hooks each round; every hook has a no-op default, so a plugin overrides only what it
changes:

- `client_config(rnd, pid)`: fields of that client's `fedtune.wire.protocol.TrainInstruction`
  (only `protocol.PLUGIN_FIELDS`: the settings objects a plugin owns);
- `select_cohort(rnd, pids)`: choose the cohort from the sampled partition ids;
- `client_weight(rnd, pid)`: a factor in [0, 1] on that client's delta in the aggregate
  (after user-level clipping, so a client's DP sensitivity never grows);
- `extras(rnd, clients)`: fields added to the round's ledger line, from the accepted
  clients' typed reports (`strategies.pipeline.ClientReport`); the server reads them through
  `round_extras`, which refuses a top-level key outside the plugin's `extras_keys`.

What a release says of the extras (issue 26, LMATTACK2 1): under user-level DP the cohort's
size and make-up are secret, so every extra is the curator's (`fedtune.run.curator_log`
moves it, null left in rounds.jsonl) unless its plugin lists its dotted path in
`release_safe`. Only a setting or a fixed note may be listed: nothing that counts, sums or
weights the cohort's members, and no key whose presence depends on the cohort. A private
value goes whole (its keys can be partition ids), but a dict holding a release-safe path
keeps its own keys (null): those must be fixed names. Every `extras_keys` key of a run's
plugins is in every round of the release, null where private or not filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedtune.config import ConfigError
from fedtune.config.accountant_steps import declare_trained_sizes
from fedtune.run.curator_log import declare_plugin_extras

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
    # The round record's top-level keys `extras` may fill (registered with the release
    # split as the plugin registers), and the dotted paths under them a user-level release
    # may keep (see the module docstring); every other path is the curator's.
    extras_keys: ClassVar[frozenset[str]] = frozenset()
    release_safe: ClassVar[frozenset[str]] = frozenset()

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

    def extras(self, rnd: int, clients: Sequence[ClientReport]) -> dict[str, Any]:
        """The hook a plugin overrides: its fields of the round's ledger line."""
        return {}

    def round_extras(self, rnd: int, clients: Sequence[ClientReport]) -> dict[str, Any]:
        """`extras`, refused when it fills a key the release split does not know as this
        plugin's (such a key would reach a user-level release unsplit)."""
        extras = self.extras(rnd, clients)
        undeclared = sorted(set(extras) - self.extras_keys)
        if undeclared:
            raise ValueError(f"plugin {self.name!r} returned round extras {undeclared} "
                             f"outside its extras_keys {sorted(self.extras_keys)}")
        return extras

    def report_groups(self) -> tuple[str, ...]:
        """The figure groups (`fedtune.wire.protocol.EXTRA_GROUPS`) this plugin's clients
        report; the server rejects a reply carrying any group no part of the run uses."""
        return ()

    @classmethod
    def sizes_per_round(cls, params: dict[str, Any]) -> int:
        """How many example counts (`trained_sizes`) a client may train on in one round at
        most, from the plugin's table alone: the preflight counts each one's DP-SGD steps
        (`fedtune.config.accountant_steps.planned_steps`)."""
        return 1

    def trained_sizes(self, n: int) -> list[int]:
        """How many examples a client holding `n` may train on in a round under this
        plugin (one count, or several where the client's own state decides which): the
        server charges the DP-SGD release of each of them every round
        (`strategies.release_plan`)."""
        return [n]


_PLUGINS: dict[str, type[Plugin]] = {}


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    if not cls.name or cls.name in _PLUGINS:
        raise ValueError(f"plugin name {cls.name!r} is empty or registered twice")
    outside = sorted(p for p in cls.release_safe if p.split(".")[0] not in cls.extras_keys)
    if outside:
        raise ValueError(f"plugin {cls.name!r} declares release-safe {outside} outside its "
                         f"extras_keys {sorted(cls.extras_keys)}")
    declare_plugin_extras(cls.name, cls.extras_keys, cls.release_safe)
    declare_trained_sizes(cls.name, cls.sizes_per_round)
    _PLUGINS[cls.name] = cls
    return cls


def available_plugins() -> list[str]:
    return sorted(_PLUGINS)


def plugin_class(name: str) -> type[Plugin]:
    """The registered plugin class `name` (KeyError naming the registered ones)."""
    if name not in _PLUGINS:
        raise KeyError(f"no plugin {name!r}; registered: {', '.join(available_plugins())}")
    return _PLUGINS[name]


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


"""`[runtime]` settings reach the code that uses them from the experiment config, and the
environment variable overrides them (fedtune.config.runtime): issue 28 found
`runtime.grid_poll_s` documented but never read (the grid read the environment only), and
the simulation setting `FEDTUNE_GRID_POLL_S` itself, which then overrode any config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedtune.config import ConfigError, config_from_toml, load_config
from fedtune.config.runtime import GRID_POLL_AUTO_S, runtime_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_poll_env(monkeypatch):
    monkeypatch.delenv("FEDTUNE_GRID_POLL_S", raising=False)


class _Clock:
    """Stands in for the `time` module of strategies.grid_io: sleeping advances the clock,
    and each pause is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class _SilentGrid:
    """Two connected nodes that never answer: discovery pulls until its timeout."""

    def get_node_ids(self):
        return [7, 8]

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return []


def _pauses_of_discovery(monkeypatch, cfg) -> list[float]:
    from strategies import grid_io
    from strategies.server import discover_workers

    clock = _Clock()
    monkeypatch.setattr(grid_io, "time", clock)
    roster = discover_workers(_SilentGrid(), cfg, assigned={7: 0, 8: 1})
    assert roster.nodes == {}  # nobody answered: the pulls ran until the timeout
    return clock.pauses


@pytest.mark.usefixtures("task_identity")  # Flower's messages need a run id
def test_a_configs_grid_poll_reaches_the_grid_and_the_environment_overrides_it(monkeypatch):
    cfg = load_config(None, ["data.num_clients=2", "train.clients_per_round=2",
                             "train.round_timeout_s=3", "runtime.grid_poll_s=0.75"])
    pauses = _pauses_of_discovery(monkeypatch, cfg)
    assert pauses and set(pauses) == {0.75}  # the config's, not the default 0.1
    monkeypatch.setenv("FEDTUNE_GRID_POLL_S", "0.5")
    pauses = _pauses_of_discovery(monkeypatch, cfg)
    assert pauses and set(pauses) == {0.5}


def test_auto_is_the_deployments_or_the_simulations_pause():
    from flwr.superlink.grid import InMemoryGrid

    from strategies.grid_io import poll_interval

    cfg = load_config(None)
    assert cfg.runtime.grid_poll_s == "auto"
    simulation_grid = object.__new__(InMemoryGrid)  # only its type is looked at
    assert poll_interval(_SilentGrid(), cfg) == GRID_POLL_AUTO_S[False] == 0.1
    assert poll_interval(simulation_grid, cfg) == GRID_POLL_AUTO_S[True] == 0.02
    assert poll_interval() == 0.1  # no grid, no config: a deployment's default
    # A configured number holds on either grid.
    fixed = load_config(None, ["runtime.grid_poll_s=2"])
    assert fixed.runtime.grid_poll_s == 2.0 and isinstance(fixed.runtime.grid_poll_s, float)
    assert poll_interval(simulation_grid, fixed) == poll_interval(_SilentGrid(), fixed) == 2.0
    assert runtime_settings(fixed, simulation=True).grid_poll_s == 2.0


def test_auto_round_trips_through_the_resolved_toml():
    cfg = load_config(None)
    again = config_from_toml(cfg.to_toml())
    assert again.runtime.grid_poll_s == "auto"
    fixed = config_from_toml(load_config(None, ["runtime.grid_poll_s=0.3"]).to_toml())
    assert fixed.runtime.grid_poll_s == 0.3


@pytest.mark.parametrize(("override", "message"), [
    ("runtime.grid_poll_s=fast",
     "runtime.grid_poll_s='fast' must be a number of seconds in (0, 60] or 'auto'"),
    ("runtime.grid_poll_s=61", "runtime.grid_poll_s must be in (0, 60] seconds, got 61.0"),
    ("runtime.grid_poll_s=true", "runtime.grid_poll_s must be an integer, got True"),
])
def test_a_bad_grid_poll_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_every_send_from_the_server_passes_the_runs_pause():
    """The rounds and discovery hand `send_and_receive` the run's pause (a call without it
    would fall back to the defaults and ignore the config)."""
    calls = []
    for path in sorted((ROOT / "strategies").rglob("*.py")):
        if path.name == "grid_io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "send_and_receive", "discover"):
                calls.append((path.name, node.lineno,
                              any(k.arg == "pause" for k in node.keywords)))
    assert {name for name, _, _ in calls} >= {"server.py", "discovery.py"}
    assert all(has for _, _, has in calls), calls


def test_the_simulation_no_longer_sets_the_override():
    """`fedtune run` once set FEDTUNE_GRID_POLL_S for its ServerApp, which then overrode the
    config's runtime.grid_poll_s; its 0.02 s is now what "auto" means on the simulation's
    grid."""
    source = (ROOT / "fedtune" / "sim" / "driver.py").read_text()
    assert "POLL_ENV" not in source and "FEDTUNE_GRID_POLL_S" not in source


@pytest.mark.parametrize(("env", "expected"), [(None, "0.25"), ("0.5", "0.5")])
def test_deploy_local_hands_the_configs_supernode_poll_to_its_nodes(cli, tmp_path,
                                                                     monkeypatch, env,
                                                                     expected):
    """A SuperNode reads no experiment config; `fedtune deploy local` has one and passes
    its `runtime.supernode_poll_s` (or the environment's override) to the nodes it starts."""
    import fedtune.deploy.local as local

    seen = {}

    class Recorder:
        def __init__(self, root, nodes, env):
            seen.update(env)
            raise SystemExit(7)  # nothing is started

    monkeypatch.setattr(local, "LocalDeployment", Recorder)
    if env is None:
        monkeypatch.delenv("FEDTUNE_SUPERNODE_POLL_S", raising=False)
    else:
        monkeypatch.setenv("FEDTUNE_SUPERNODE_POLL_S", env)
    res = cli("deploy", "local", "experiments/quickstart.toml", "--out", str(tmp_path / "r"),
              "--set", "data.num_clients=2", "--set", "train.clients_per_round=2",
              "--set", "runtime.supernode_poll_s=0.25")
    assert res.code == 7, res.output
    assert seen == {"FEDTUNE_SUPERNODE_POLL_S": expected}

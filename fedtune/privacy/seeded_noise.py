"""Deployments refuse `privacy.reproducible_noise`.

Seeded noise makes a simulation re-run bit for bit, but anyone holding the config can
regenerate the DP noise and subtract it (issue 16): no epsilon holds against them. That is a
tool for simulation studies; on real devices with real data the noise must be secret, so every
deployment entry point (`fedtune deploy local`, the ClientApp worker, the ServerApp in a
deployment) stops on it with this one line.
"""

from __future__ import annotations

from fedtune.compat.flower_deploy import is_simulation_grid
from fedtune.config import ExperimentConfig
from fedtune.config.errors import DeployError

REFUSAL = ("privacy.reproducible_noise = true: seeded noise is for simulation studies only "
           "(anyone with the config can remove it); a deployment refuses it")


class SeededNoiseRefused(DeployError):
    """A deployment was asked to use seeded (reproducible) DP noise."""


def refuse_seeded_noise(cfg: ExperimentConfig) -> None:
    if cfg.privacy.reproducible_noise:
        raise SeededNoiseRefused(REFUSAL)


def check_server_runtime(cfg: ExperimentConfig, grid: object) -> None:
    """For the ServerApp: the simulation engine hands it Flower's in-memory grid (both
    `fedtune run` and `flwr run` on a `--simulation` SuperLink); any other grid talks to
    real SuperNodes, where seeded noise is refused."""
    if not is_simulation_grid(grid):
        refuse_seeded_noise(cfg)

"""Deployments refuse `privacy.reproducible_noise`.

Seeded noise makes a simulation re-run bit for bit, but anyone holding the config can
regenerate the DP noise and subtract it (issue 16): no epsilon holds against them. That is a
tool for simulation studies; on real devices with real data the noise must be secret, so every
deployment entry point (`fedtune deploy local`, the ClientApp worker, the ServerApp in a
deployment) stops on it with this one line.
"""

from __future__ import annotations

from fedtune.config import ExperimentConfig
from fedtune.deploy.address import DeployError

REFUSAL = ("privacy.reproducible_noise = true: seeded noise is for simulation studies only "
           "(anyone with the config can remove it); a deployment refuses it")


# The class of the grid Flower's simulation engine hands a ServerApp (1.41, 1.42).
IN_MEMORY_GRID = "InMemoryGrid"


class SeededNoiseRefused(DeployError):
    """A deployment was asked to use seeded (reproducible) DP noise."""


def refuse_seeded_noise(cfg: ExperimentConfig) -> None:
    if cfg.privacy.reproducible_noise:
        raise SeededNoiseRefused(REFUSAL)


def check_server_runtime(cfg: ExperimentConfig, grid: object) -> None:
    """For the ServerApp: the simulation engine hands it Flower's in-memory grid (both
    `fedtune run` and `flwr run` on a `--simulation` SuperLink); any other grid talks to
    real SuperNodes, where seeded noise is refused. Flower exports no public way to tell
    the two apart, so this reads the grid's class name rather than importing Flower's
    internal module: should a release rename the class, the check fails closed (seeded
    noise refused in simulation too), never open."""
    if type(grid).__name__ != IN_MEMORY_GRID:
        refuse_seeded_noise(cfg)

"""Where DP randomness comes from.

A DP guarantee holds only against an adversary who cannot predict the noise or the
sampling. So by default every DP draw (DP-SGD noise, Poisson batches, user-level cohorts
and noise, split-mode smashed-data noise) comes from a generator seeded with fresh bits
from the operating system's CSPRNG (`secrets`), drawn anew for each use and never stored,
logged, checkpointed or sent: no config, checkpoint or message determines it.

`privacy.reproducible_noise = true` derives the same draws from the run's seed instead, so a
simulation study re-runs bit for bit. Its epsilons hold against nobody who has the config,
and every place that shows them carries `SEEDED_NOISE_NOTE`.

Everything that is not DP randomness (initialisation, partitions, evaluation order, fault
injection) stays seeded from `seed` in both modes.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

SEEDED_NOISE_NOTE = "seeded noise: not a guarantee against anyone who has the config"
SECRET_NOISE_NOTE = ("secret noise: DP noise and sampling drawn from the OS CSPRNG, "
                     "never stored or sent")
# Bits of OS entropy behind one generator. torch's CPU and CUDA generators take a 64-bit
# seed; numpy's PCG64 takes 128.
_TORCH_SEED_BITS = 64
_NUMPY_SEED_BITS = 128


def noise_note(reproducible: bool) -> str:
    """The line every epsilon is shown with: what the noise is secret from."""
    return SEEDED_NOISE_NOTE if reproducible else SECRET_NOISE_NOTE


def dp_torch_generator(device: torch.device | str, reproducible_seed: int | None = None
                       ) -> torch.Generator:
    """A torch generator for DP draws on `device`: seeded from the OS CSPRNG, or from
    `reproducible_seed` when the run is in reproducible-noise mode (and only then)."""
    generator = torch.Generator(device=device)
    if reproducible_seed is None:
        return generator.manual_seed(secrets.randbits(_TORCH_SEED_BITS))
    return generator.manual_seed(reproducible_seed)


def dp_numpy_rng(reproducible_seed: int | None = None) -> np.random.Generator:
    """A numpy generator for DP draws (server-side noise and cohorts): 128 bits from the OS
    CSPRNG, or `reproducible_seed` in reproducible-noise mode."""
    if reproducible_seed is None:
        return np.random.Generator(np.random.PCG64(secrets.randbits(_NUMPY_SEED_BITS)))
    return np.random.Generator(np.random.PCG64(reproducible_seed))


def stream_seed(reproducible_seed: int | None, stream: str) -> int | None:
    """In reproducible-noise mode, a seed of its own for each DP stream of one draw site
    (e.g. "poisson" and "noise"), so that two generators on one device never repeat each
    other's draws; None (secret) stays None."""
    if reproducible_seed is None:
        return None
    digest = hashlib.sha256(f"{reproducible_seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are signed 64-bit

"""One facade over Opacus' PrivacyEngine for a client's local training."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtune.config import SampleDPConfig
from fedtune.privacy.randomness import dp_torch_generator, stream_seed
from fedtune.torch_setup import model_device

if TYPE_CHECKING:  # imported when used: see fedtune.privacy.accounting
    from opacus import PrivacyEngine
    from opacus.grad_sample import AbstractGradSampleModule


@dataclass
class PrivateTraining:
    """What `make_private` hands back: use these in place of the originals."""

    model: AbstractGradSampleModule
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: Any
    engine: PrivacyEngine
    # The rate at which `loader` includes each example in a batch: the q to account.
    sample_rate: float

    def close(self) -> None:
        # Hooks live on the trainable modules; remove them so a later wrap of the same
        # modules (next round in this process) starts clean. `to_standard_module` is Opacus'
        # public way to strip the hooks and grad-sample attributes (every grad-sample mode's
        # wrapper has it); it hands back the wrapped module, which the caller already holds.
        self.model.to_standard_module()


def _engine(accountant: str) -> PrivacyEngine:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # "Secure RNG turned off" is about Opacus' secure_mode, which needs torchcsprng
        # (not installed). Our noise and Poisson generators are seeded with fresh OS-CSPRNG
        # bits instead (fedtune.privacy.randomness); that does not add secure_mode's
        # floating-point hardening, and the README says so.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        return PrivacyEngine(accountant=accountant)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 cfg: SampleDPConfig, noise_multiplier: float,
                 reproducible_seed: int | None = None) -> PrivateTraining:
    """Poisson sampling over `loader`'s dataset, per-sample clipping at `cfg.max_grad_norm`,
    Gaussian noise.

    The Poisson masks and the noise come from generators no config determines (seeded from
    the OS CSPRNG), whatever generator `loader` carries. Only `reproducible_seed` (pass it
    in `privacy.reproducible_noise` mode alone) makes them follow a seed."""
    from opacus.data_loader import DPDataLoader

    engine = _engine(cfg.accountant)
    model.train()  # Opacus refuses a model in eval mode
    criterion = nn.CrossEntropyLoss()
    # Opacus' Poisson sampler draws from the loader's generator (the caller's, usually
    # seeded): build the Poisson loader here, with the DP generator, at Opacus' own rate
    # 1 / len(loader) (see fedtune.privacy.plan.poisson_sample_rate).
    sampling = dp_torch_generator("cpu", stream_seed(reproducible_seed, "poisson"))
    poisson = DPDataLoader.from_data_loader(loader, generator=sampling)
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples; do not wrap it again
        grad_sample_mode=cfg.grad_sample_mode,
        # Opacus draws the noise on the gradients' device, with this generator.
        noise_generator=dp_torch_generator(model_device(model),
                                           stream_seed(reproducible_seed, "noise")),
    )
    if len(out) == 4:  # ghost clipping also wraps the criterion
        dp_model, dp_optimizer, criterion, dp_loader = out
    else:
        dp_model, dp_optimizer, dp_loader = out
    # What make_private does for poisson_sampling=True: a Poisson batch is one step.
    dp_model.forbid_grad_accumulation()
    return PrivateTraining(dp_model, dp_optimizer, dp_loader, criterion, engine,
                           sample_rate=float(poisson.sample_rate))

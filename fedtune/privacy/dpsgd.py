"""One facade over Opacus' PrivacyEngine for a client's local training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtune.config import SampleDPConfig
from fedtune.torch_setup import model_device

if TYPE_CHECKING:  # imported when used: see fedtune.privacy.accounting
    from opacus import PrivacyEngine


@dataclass
class PrivateTraining:
    """What `make_private` hands back: use these in place of the originals."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: Any
    engine: PrivacyEngine

    def close(self) -> None:
        # Hooks live on the trainable modules; remove them so a later wrap of the same
        # modules (next round in this process) starts clean.
        closer = getattr(self.model, "_close", None)
        if closer is not None:
            closer()


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 cfg: SampleDPConfig, noise_multiplier: float, seed: int) -> PrivateTraining:
    """Poisson sampling, per-sample clipping at `cfg.max_grad_norm`, Gaussian noise."""
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=cfg.accountant)
    model.train()  # Opacus refuses a model in eval mode
    criterion = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=cfg.grad_sample_mode,
        # Opacus draws the noise on the gradients' device, with this generator.
        noise_generator=torch.Generator(device=model_device(model)).manual_seed(seed),
    )
    if len(out) == 4:  # ghost clipping also wraps the criterion
        dp_model, dp_optimizer, criterion, dp_loader = out
    else:
        dp_model, dp_optimizer, dp_loader = out
    return PrivateTraining(dp_model, dp_optimizer, dp_loader, criterion, engine)

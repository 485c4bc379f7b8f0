"""One facade over Opacus' PrivacyEngine for a client's local training."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fedtune.config import SampleDPConfig
from fedtune.privacy.randomness import DPRandom, dp_source

if TYPE_CHECKING:  # imported when used: see fedtune.privacy.accounting
    from opacus import PrivacyEngine
    from opacus.grad_sample import AbstractGradSampleModule
    from opacus.optimizers import DPOptimizer


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
        # (not installed). Our noise and Poisson masks come from fedtune's own CSPRNG
        # (fedtune.privacy.randomness) instead; that does not add secure_mode's
        # floating-point hardening, and docs/privacy.md says so.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        return PrivacyEngine(accountant=accountant)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 cfg: SampleDPConfig, noise_multiplier: float,
                 reproducible_seed: int | None = None,
                 criterion: nn.Module | None = None) -> PrivateTraining:
    """Poisson sampling over `loader`'s dataset, per-sample clipping at `cfg.max_grad_norm`,
    Gaussian noise.

    The Poisson masks and the noise come from `fedtune.privacy.randomness` (256-bit secret
    keys), whatever generator `loader` carries; no torch generator draws either. Only
    `reproducible_seed` (pass it in `privacy.reproducible_noise` mode alone) makes them
    follow a seed. `criterion`: the task's loss (default: cross entropy)."""
    engine = _engine(cfg.accountant)
    model.train()  # Opacus refuses a model in eval mode
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    poisson = poisson_loader(loader, dp_source("poisson", reproducible_seed))
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples; do not wrap it again
        grad_sample_mode=cfg.grad_sample_mode,
        noise_generator=None,  # never drawn from: SecretNoise adds the noise (below)
    )
    if len(out) == 4:  # ghost clipping also wraps the criterion
        dp_model, dp_optimizer, criterion, dp_loader = out
    else:
        dp_model, dp_optimizer, dp_loader = out
    use_secret_noise(dp_optimizer, dp_source("noise", reproducible_seed))
    # What make_private does for poisson_sampling=True: a Poisson batch is one step.
    dp_model.forbid_grad_accumulation()
    return PrivateTraining(dp_model, dp_optimizer, dp_loader, criterion, engine,
                           sample_rate=poisson.batch_sampler.sample_rate)


def poisson_loader(loader: DataLoader, source: DPRandom) -> DataLoader:
    """`loader`'s data under Poisson sampling from `source`, at Opacus' own rate
    1 / len(loader) (see fedtune.privacy.plan.poisson_sample_rate), for len(loader) steps,
    with Opacus' collate for empty batches. What `DPDataLoader.from_data_loader` builds,
    except that the masks come from `source` rather than a torch generator."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    dataset = loader.dataset
    sampler = secret_poisson_sampler(num_samples=len(dataset), sample_rate=1 / len(loader),
                                     steps=len(loader), source=source)
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=loader.collate_fn,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context,
                      prefetch_factor=loader.prefetch_factor,
                      persistent_workers=loader.persistent_workers)


def secret_poisson_sampler(*, num_samples: int, sample_rate: float, steps: int,
                           source: DPRandom) -> Sampler[list[int]]:
    """Opacus' Poisson batch sampler (each example joins each of `steps` batches
    independently with probability `sample_rate`) with its masks drawn from `source`."""
    return _secret_sampler_class()(num_samples=num_samples, sample_rate=sample_rate,
                                   generator=None, steps=steps, source=source)


@functools.cache
def _secret_sampler_class() -> type:
    # Built on first use: Opacus costs ~2 s to import (see fedtune.privacy.accounting).
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class SecretPoissonSampler(UniformWithReplacementSampler):
        """Overrides the public `__iter__`; the torch generator stays unused (None)."""

        def __init__(self, *, source: DPRandom, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.source = source

        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                mask = self.source.bernoulli(self.num_samples, self.sample_rate)
                yield np.flatnonzero(mask).tolist()

    return SecretPoissonSampler


def use_secret_noise(optimizer: DPOptimizer, source: DPRandom) -> None:
    """Make `optimizer` (the DPOptimizer class PrivacyEngine chose for the grad-sample
    mode) draw its noise from `source`. The instance is re-typed to a subclass that
    overrides the public `add_noise`, which keeps everything make_private wired to it
    (the accountant's step hook, ghost clipping's loss wrapper)."""
    optimizer.__class__ = _secret_noise_class(type(optimizer))
    optimizer.noise_source = source
    optimizer.generator = None  # nothing may draw DP noise from a torch generator


@functools.cache
def _secret_noise_class(base: type) -> type:
    class SecretNoise(base):  # type: ignore[misc, valid-type]
        noise_source: DPRandom

        def add_noise(self) -> None:
            # Opacus' own add_noise at noise multiplier 0 does the bookkeeping (p.grad =
            # the clipped sum, processed flags) and draws nothing (it returns zeros for
            # std 0). The noise is added after it, from the source. Should a later Opacus
            # draw noise at 0 anyway, that extra noise is data-independent: it cannot
            # weaken the guarantee (tests would catch the changed values).
            sigma = self.noise_multiplier
            self.noise_multiplier = 0.0
            try:
                super().add_noise()
            finally:
                self.noise_multiplier = sigma
            std = sigma * self.max_grad_norm
            grads = [p.grad for p in self.params]
            # One draw per (dtype, device): a step's noise in one call, not one per tensor.
            groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
            for grad in grads:
                groups.setdefault((grad.dtype, grad.device), []).append(grad)
            for (dtype, device), group in groups.items():
                noise = self.noise_source.normal((sum(g.numel() for g in group),), std,
                                                 dtype=dtype, device=device)
                for grad, part in zip(group, noise.split([g.numel() for g in group]),
                                      strict=True):
                    grad.add_(part.view_as(grad))

    SecretNoise.__name__ = SecretNoise.__qualname__ = f"SecretNoise{base.__name__}"
    return SecretNoise

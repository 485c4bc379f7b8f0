"""A client's local training: plain SGD/Adam, or Opacus DP-SGD with a persistent accountant."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from fedtune.config import ExperimentConfig
from fedtune.privacy import DPHistory, epsilon_of, make_private
from fedtune.privacy.plan import Release, local_steps, planned_release
from fedtune.runtime.torch_setup import model_device
from fedtune.task.kinds import task_kind
from fedtune.tuning import TunedModel
from fedtune.tuning.prefix_cache import prefix_layer, training_view

# Known, understood warnings that would otherwise print once per actor per round.
# (Opacus' "Secure RNG turned off" is handled where the engine is made: fedtune.privacy.dpsgd.)
_EXPECTED_WARNINGS = (
    "Full backward hook is firing",  # inputs of the frozen backbone never need grads
    "Optimal order is the largest alpha",  # RDP search range note; PRV is the default
)


@dataclass
class LocalResult:
    loss: float
    steps: int
    examples_seen: int
    epsilon: float | None
    noise_multiplier: float
    sample_rate: float
    flops: float
    # What the step reported besides the loss (split mode: smashed bytes, server FLOPs).
    extras: dict[str, float] = field(default_factory=dict)


class LocalStep(Protocol):
    """One local training step's forward and backward; local_train owns sampling, the
    optimizer and DP. Split mode swaps in a step that talks to the server body."""

    def __call__(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
        """Leave gradients on the trainable tensors; return the (detached) loss."""
        ...

    def flops(self, model: TunedModel, data: TensorDataset, examples: int) -> float:
        """Client-side FLOPs of the steps taken on `examples` examples in all."""
        ...

    def extras(self) -> dict[str, float]:
        ...

    # Optional: `privacy_events() -> list[Release]`, further DP releases of this round's
    # steps as (sigma, q, steps) (split mode: the noised smashed data). local_train adds
    # them to the client's history before it computes the epsilon.


@dataclass(frozen=True)
class BatchParts:
    """How `PlainStep` cuts a batch whose forward would hold too much (an LM's logits past
    `fedtune.task.lm.LOGITS_BUDGET`): `most(row length)` rows a forward may hold (None: no
    bound). Under DP-SGD, `private` is the DP optimizer: each part's per-sample gradients
    are clipped into its sum by a skipped step (Opacus' `signal_skip_step`, what its
    BatchMemoryManager does) and the last part's step noises that sum once."""

    most: Callable[[int], int | None]
    private: torch.optim.Optimizer | None = None


class PlainStep:
    """The whole model on the client: forward, loss, backward; in parts of at most
    `parts.most` rows where a forward of the whole batch would pass the task kind's budget,
    with the whole batch's gradient."""

    def __init__(self, tuned: TunedModel | None = None, parts: BatchParts | None = None) -> None:
        self.tuned = tuned
        self.parts = parts

    def __call__(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
        rows = int(labels.shape[0])
        most = None if self.parts is None else self.parts.most(int(mask.shape[-1]))
        if most is None or rows <= most:
            loss = self._loss(model, criterion, ids, mask, labels)
            loss.backward()
            return loss.detach()
        private = self.parts.private
        total = torch.zeros(())
        for start in range(0, rows, most):
            part = slice(start, min(start + most, rows))
            share = (part.stop - start) / rows
            loss = self._loss(model, criterion, ids[part], mask[part], labels[part])
            # The criterion is a batch mean. Plain gradients add up over the parts, so each
            # part's weighs by its share of the batch; Opacus' hooks undo each forward's own
            # mean into per-sample gradients, so a private part's loss goes in as it is.
            (loss if private is not None else loss * share).backward()
            total = total + loss.detach().cpu() * share
            if private is not None and part.stop < rows:
                private.signal_skip_step(do_skip=True)
                private.step()  # clips this part's per-sample gradients into the sum
                private.zero_grad(set_to_none=True)  # keeps the sum: the step was skipped
        return total

    def _loss(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
              mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = criterion(model(ids, mask), labels)
        if self.tuned is not None:
            loss = loss + unused_domain_head(self.tuned)
        return loss

    def flops(self, model: TunedModel, data: TensorDataset, examples: int) -> float:
        return examples * flops_per_example(model, data)

    def extras(self) -> dict[str, float]:
        return {}

    def privacy_events(self) -> list[Release]:
        return []  # the whole step is DP-SGD: nothing released beside the update


def _optimizer(model: TunedModel, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    groups = model.param_groups(lr)
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups)


def _batches(loader: DataLoader, steps: int):
    """Exactly `steps` batches, restarting the loader when an epoch runs out."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def local_train(model: TunedModel, data: TensorDataset, cfg: ExperimentConfig,
                history: DPHistory, seed: int, lr: float | None = None,
                step: LocalStep | None = None) -> LocalResult:
    """Train `model`'s trainable tensors in place for `local_steps(cfg, len(data))` steps.

    With sample-level DP, noise is calibrated so that a client taking part in every round
    ends at most at the target epsilon (`planned_release`, which the server charges too);
    `history` accumulates this round's steps. DP noise and Poisson batches are secret;
    `seed` drives them only in `privacy.reproducible_noise` mode (it always drives the
    shuffling of plain training).
    `step` runs each step's forward and backward (default: the whole model, `PlainStep`).
    Where `train.prefix_cache` applies, the steps start from the cached states entering the
    method's first trainable block (`fedtune.tuning.prefix_cache.training_view`): the
    loader then carries row indices into the cache in place of token ids, so the batches
    and Poisson samples pick the same examples.
    """
    tuned = model  # the step keeps the tuned model (its domain head, its logits' width)
    kind = task_kind(cfg.task.kind)
    cached = training_view(model, data, cfg)
    if cached is not None:
        model, data = cached
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    n = len(data)
    steps = local_steps(cfg, n)
    batch_size = min(cfg.train.batch_size, n)
    # Shuffling for plain training is not DP randomness: it follows the seed. With DP-SGD,
    # make_private replaces it by Poisson sampling from a DP generator.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = _optimizer(model, cfg, cfg.train.lr if lr is None else lr)
    dp = cfg.privacy.sample
    sigma, sample_rate = 0.0, 0.0
    # The task kind's loss: a classifier's cross entropy, a language model's per-sequence
    # next-token loss (each one a batch mean of per-example losses, as DP-SGD clips).
    criterion: nn.Module = kind.criterion()
    train_model: nn.Module = model
    private = None
    if dp.enabled:
        sigma, sample_rate, steps = planned_release(cfg, n)
        private = make_private(
            model, optimizer, loader, dp, sigma, criterion=criterion,
            reproducible_seed=seed if cfg.privacy.reproducible_noise else None)
        if private.sample_rate != sample_rate:  # the accountant must be told the real rate
            raise RuntimeError(f"the Poisson loader samples at {private.sample_rate}, but "
                               f"the accounted rate is {sample_rate}")
        train_model, optimizer, loader, criterion = (
            private.model, private.optimizer, private.loader, private.criterion)
    # The default step cuts a batch past the kind's budget into parts (an LM's logits).
    step = step or PlainStep(tuned, BatchParts(lambda length: kind.forward_rows(tuned, length),
                                               optimizer if dp.enabled else None))

    clip_norm = 0.0 if dp.enabled else cfg.train.max_grad_norm
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    device = model_device(model)
    losses, seen = [], 0
    try:
        for index, batch in enumerate(_batches(loader, steps)):
            ids, mask, labels = (t.to(device, non_blocking=True) for t in batch)
            optimizer.zero_grad(set_to_none=True)
            if labels.numel() == 0:
                _empty_batch_step(optimizer, model, dp.grad_sample_mode)
                continue
            loss = step(train_model, criterion, ids, mask, labels, index)
            if clip_norm:
                nn.utils.clip_grad_norm_(trainable, clip_norm)
            optimizer.step()
            losses.append(loss.detach().item())
            seen += int(labels.shape[0])  # examples (an LM's labels are [B, T])
    finally:
        if private is not None:
            private.close()
    if dp.enabled:
        history.add(sigma, sample_rate, steps)
    # Before the step's releases are read: a split step sends the rows of trailing skipped
    # (empty-batch) steps when it is finished, and those are releases too.
    flops = step.flops(model, data, seen)
    events = getattr(step, "privacy_events", None)
    for event in events() if events is not None else []:
        history.add(*event)
    epsilon = None
    if dp.enabled or history.entries:
        epsilon = epsilon_of(history, dp.delta, dp.accountant)
    return LocalResult(
        loss=sum(losses) / max(len(losses), 1), steps=steps, examples_seen=seen,
        epsilon=epsilon, noise_multiplier=sigma, sample_rate=sample_rate,
        flops=flops, extras=step.extras(),
    )


def unused_domain_head(model: TunedModel) -> torch.Tensor | float:
    """A zero that still reaches the domain head when nothing weights by it: Opacus wants a
    (here zero) per-sample gradient for every trainable tensor."""
    logit = getattr(getattr(model, "head", None), "last_domain_logit", None)
    return 0.0 if logit is None else 0.0 * logit.mean()


def _empty_batch_step(optimizer: torch.optim.Optimizer, model: TunedModel, mode: str) -> None:
    """A Poisson batch can be empty; it is still a step: Opacus adds noise to a zero sum and
    the accountant counts it. BERT cannot run a batch of zero rows, so hand the optimizer
    zero-row per-sample gradients instead of a forward pass."""
    if mode == "ghost":
        raise RuntimeError("an empty Poisson batch under grad_sample_mode='ghost' is not "
                           "supported; raise train.batch_size or use grad_sample_mode='hooks'")
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


_FLOPS_CACHE: dict[tuple[str, int, int, int, str], float] = {}


def flops_per_example(model: TunedModel, data: TensorDataset) -> float:
    """Forward + backward FLOPs of one training example, counted by torch's FlopCounterMode.
    Matmul FLOPs are linear in the batch, so examples x this is the exact count of the
    plain training step; it is measured once per (method, size, sequence length, all
    parameters: a backbone with pruned layers has fewer, model class: a model fed from the
    prefix cache runs fewer blocks)."""
    ids, mask, _ = (t.to(model_device(model)) for t in data[0])
    tuned = getattr(model, "tuned", model)  # a CachedForward runs its tuned model's suffix
    key = (model.method, model.num_trainable(), int(mask.shape[0]),
           sum(p.numel() for p in tuned.parameters()),
           f"{type(model).__name__}@{prefix_layer(tuned)}")
    if key not in _FLOPS_CACHE:
        counter = FlopCounterMode(display=False)
        with counter:
            model(ids.unsqueeze(0), mask.unsqueeze(0)).sum().backward()
        model.zero_grad(set_to_none=True)
        _FLOPS_CACHE[key] = float(counter.get_total_flops())
    return _FLOPS_CACHE[key]

"""Importance-weighted local loss for population expansion.

The model's domain head (`tuning.domain_head`) learns p(target | x) from every client's
examples (target clients label theirs 1, source clients 0). A source client weights each
example's task loss by p(target|x) / p(source|x) = exp(domain logit), clipped at
`max_weight`, so source examples that look like the target domain count more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from clients.train import flops_per_example
from fedtune.tuning import TunedModel
from fedtune.wire.protocol import DomainSettings


@dataclass(frozen=True)
class DomainWeighting:
    is_target: bool
    max_weight: float

    @classmethod
    def from_settings(cls, settings: DomainSettings | None) -> DomainWeighting | None:
        """The weighting the server asked for, if any."""
        if settings is None:
            return None
        return cls(settings.is_target, settings.max_weight)

    def loss(self, model: TunedModel, logits: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, float]:
        """Mean over the batch of (weighted task loss + domain loss) per example, and the
        batch's mean importance weight. A per-example mean keeps Opacus' per-sample
        gradients exact (it expects loss_reduction='mean')."""
        domain_logit = getattr(model.head, "last_domain_logit", None)
        if domain_logit is None:
            raise RuntimeError("importance weighting needs the model's domain head "
                               "(tuning.domain_head = true)")
        target = torch.full_like(domain_logit, float(self.is_target))
        domain_loss = F.binary_cross_entropy_with_logits(domain_logit, target, reduction="none")
        task_loss = F.cross_entropy(logits, labels, reduction="none")
        if self.is_target:
            weights = torch.ones_like(task_loss)
        else:
            weights = domain_logit.detach().exp().clamp(max=self.max_weight)
        return (weights * task_loss + domain_loss).mean(), float(weights.mean())


@dataclass
class ImportanceStep:
    """A local step (clients.train.LocalStep) with the importance-weighted loss. `tuned` is
    the unwrapped model, whose head keeps the last domain logit."""

    weighting: DomainWeighting
    tuned: TunedModel
    _weights: list[tuple[float, int]] = field(default_factory=list)

    def __call__(self, model: nn.Module, criterion: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
        loss, mean_weight = self.weighting.loss(self.tuned, model(ids, mask), labels)
        loss.backward()
        self._weights.append((mean_weight, int(labels.numel())))
        return loss.detach()

    def flops(self, model: TunedModel, data: TensorDataset, examples: int) -> float:
        return examples * flops_per_example(model, data)

    def extras(self) -> dict[str, float]:
        """The mean importance weight over the examples trained."""
        seen = sum(n for _, n in self._weights)
        if not seen:
            return {}
        return {"importance-weight": sum(w * n for w, n in self._weights) / seen}

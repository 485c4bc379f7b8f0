"""Importance-weighted local loss for population expansion.

The model's domain head (`tuning.domain_head`) learns p(target | x) from every client's
examples (target clients label theirs 1, source clients 0). A source client weights each
example's task loss by p(target|x) / p(source|x) = exp(domain logit), clipped at
`max_weight`, so source examples that look like the target domain count more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedtune.tuning import TunedModel


@dataclass(frozen=True)
class DomainWeighting:
    is_target: bool
    max_weight: float

    @classmethod
    def from_config(cls, config: object) -> DomainWeighting | None:
        """The weighting the server asked for in a ConfigRecord, if any."""
        if "domain-target" not in config:  # type: ignore[operator]
            return None
        return cls(bool(config["domain-target"]),  # type: ignore[index]
                   float(config["importance-max"]))  # type: ignore[index]

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

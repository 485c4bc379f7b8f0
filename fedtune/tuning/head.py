"""Head-only tuning (linear probing): the frozen backbone's pooled output feeds the
classification head, and the head is the only thing that trains and is federated.

Every block is frozen, so the frozen prefix is the whole block list: the cache
(fedtune.tuning.prefix_cache) holds the final blocks' states and a step runs the final
norm (decoders), the pooling and the head only.
"""

from __future__ import annotations

import torch

from fedtune.config import ConfigError, TuningConfig
from fedtune.config.methods import HeadConfig as HeadConfig  # its former home
from fedtune.models import Backbone
from fedtune.models.families import FamilyError, derive_structure
from fedtune.tuning.base import ClassificationHead, TunedModel, masked_mean, pooled_head_from
from fedtune.tuning.prefix import FrozenPrefix
from fedtune.tuning.registry import register_builder


class HeadModel(TunedModel):
    method = "head"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone.model
        self.head = ClassificationHead(backbone.hidden_size, num_labels, cfg.head_hidden,
                                       cfg.domain_head)
        try:
            layers = len(derive_structure(self.backbone).layers)
        except FamilyError:
            layers = 0  # blocks not found: trains from the whole forward, never a cache
        if layers:
            try:
                self.prefix = FrozenPrefix(self.backbone, layers, backbone.hash, backbone.name,
                                           "tuning.method='head' (frozen prefix)")
            except ConfigError:
                self.prefix = None  # a family the block runner cannot reproduce: no cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Nothing in the backbone trains: no graph through it.
        with torch.no_grad():
            hidden = self.backbone(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state
        return self.head(masked_mean(hidden, attention_mask))

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        if self.prefix is None:
            return super().forward_from(hidden, attention_mask)
        return pooled_head_from(self.prefix, self.head, hidden, attention_mask)


@register_builder("head")
def build_head(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
               ) -> TunedModel:
    return HeadModel(backbone, cfg, num_labels)

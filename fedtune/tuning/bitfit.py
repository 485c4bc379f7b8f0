"""BitFit (Ben Zaken et al. 2022): train only the encoder's bias terms, plus the head."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import ConfigError, TuningConfig, require_positive
from fedtune.models import Backbone
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.registry import register_method


@dataclass
class BitFitConfig:
    """`[tuning.bitfit]`."""

    # Learning rate of the biases relative to train.lr (the head's).
    lr_scale: float = 0.02

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.lr_scale", self.lr_scale)


class BitFitModel(EncoderClassifier):
    method = "bitfit"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int) -> None:
        encoder = encoder_copy(backbone.model)
        biases = 0
        for name, param in encoder.named_parameters():
            param.requires_grad_(name.endswith(".bias"))
            biases += name.endswith(".bias")
        if not biases:
            # Training the head alone under the name "bitfit" would be a silent surprise.
            raise ConfigError(f"tuning.method='bitfit': {backbone.name!r} has no bias terms "
                              "to train; use prompt, lora or slash with this backbone")
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=cfg.settings("bitfit").lr_scale, domain_head=cfg.domain_head)


@register_method("bitfit", BitFitConfig)
def build_bitfit(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return BitFitModel(backbone, cfg, num_labels)

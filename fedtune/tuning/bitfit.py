"""BitFit (Ben Zaken et al. 2022): train only the encoder's bias terms, plus the head."""

from __future__ import annotations

from fedtune.config import TuningConfig
from fedtune.models import Backbone
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.registry import register_method


class BitFitModel(EncoderClassifier):
    method = "bitfit"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int) -> None:
        encoder = encoder_copy(backbone.model)
        for name, param in encoder.named_parameters():
            param.requires_grad_(name.endswith(".bias"))
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=cfg.bitfit_lr_scale, domain_head=cfg.domain_head)


@register_method("bitfit")
def build_bitfit(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return BitFitModel(backbone, cfg, num_labels)

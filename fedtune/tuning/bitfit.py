"""BitFit (Ben Zaken et al. 2022): train only the encoder's bias terms, plus the head."""

from __future__ import annotations

from torch import nn

from fedtune.config import ConfigError, TuningConfig
from fedtune.config.methods import BitFitConfig as BitFitConfig  # its former home
from fedtune.models import Backbone
from fedtune.models.families import FamilyError, derive_structure
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.prefix import FrozenPrefix
from fedtune.tuning.registry import register_builder


class BitFitModel(EncoderClassifier):
    method = "bitfit"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int) -> None:
        encoder = encoder_copy(backbone.model)
        from_layer = cfg.settings("bitfit").from_layer
        frozen = _prefix_parameters(encoder, from_layer)
        biases = 0
        for name, param in encoder.named_parameters():
            trains = name.endswith(".bias") and name not in frozen
            param.requires_grad_(trains)
            biases += trains
        if not biases:
            # Training the head alone under the name "bitfit" would be a silent surprise.
            raise ConfigError(f"tuning.method='bitfit': {backbone.name!r} has no bias terms "
                              "to train; use prompt, lora or slash with this backbone")
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=cfg.settings("bitfit").lr_scale, domain_head=cfg.domain_head)
        if from_layer > 0:
            self.prefix = FrozenPrefix(encoder, from_layer, backbone.hash, backbone.name,
                                       "tuning.bitfit.from_layer")


def _prefix_parameters(encoder: nn.Module, from_layer: int) -> set[str]:
    """Names of the parameters that run before block `from_layer`: the embedding stage and
    blocks [0, from_layer). Everything else (later blocks, a final norm) may train."""
    if from_layer == 0:
        return set()
    try:
        structure = derive_structure(encoder)
    except FamilyError as exc:
        raise ConfigError(f"tuning.bitfit.from_layer={from_layer}: cannot find this model's "
                          f"blocks ({exc}); use from_layer = 0") from None
    n = len(structure.layers)
    if from_layer >= n:
        raise ConfigError(f"tuning.bitfit.from_layer={from_layer} is out of range for this "
                          f"backbone ({n} layers): allowed 0..{n - 1} (the head-only method "
                          "trains no block at all)")
    late = {id(p) for block in list(structure.layers)[from_layer:] for p in block.parameters()}
    if structure.final_norm is not None:
        late |= {id(p) for p in structure.final_norm.parameters()}
    return {name for name, p in encoder.named_parameters() if id(p) not in late}


@register_builder("bitfit")
def build_bitfit(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return BitFitModel(backbone, cfg, num_labels)

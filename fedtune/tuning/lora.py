"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the chosen linear layers."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fedtune.config import ConfigError, TuningConfig
from fedtune.config.methods import LoRAConfig as LoRAConfig  # its former home
from fedtune.models import Backbone
from fedtune.models.families import FamilyError, derive_structure, resolve_lora_targets
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.prefix import FrozenPrefix
from fedtune.tuning.registry import register_builder

# peft calls a transformers method that transformers has deprecated; the warning is about
# peft's code, not the user's, and repeats on every client of every round.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class LoRAModel(EncoderClassifier):
    method = "lora"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> None:
        # peft is imported here, not at the top: it costs ~2 s of CPU in every process
        # (Ray actors included) that imports the method registry, LoRA run or not.
        from peft import LoraConfig, get_peft_model

        settings: LoRAConfig = cfg.settings("lora")
        # Empty targets: the model's own query/value-like projections (fedtune.models.families).
        targets = resolve_lora_targets(backbone.model, list(settings.targets),
                                       field="tuning.lora.targets")
        base = encoder_copy(backbone.model)
        layers: dict[str, Any] = {}
        structure = None
        if settings.from_layer > 0:
            structure = _structure(base, settings.from_layer)
            # peft picks blocks by their index under the block list's own name.
            layers = {"layers_to_transform": list(range(settings.from_layer,
                                                         len(structure.layers))),
                      "layers_pattern": structure.layers_path.rsplit(".", 1)[-1]}
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                            target_modules=targets, lora_dropout=0.0, bias="none",
                            fan_in_fan_out=_stores_weights_transposed(backbone.model, targets),
                            **layers)
        # peft draws lora_A at random: seed it so every process builds the same start.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                encoder = get_peft_model(base, config)
            except ValueError as exc:
                raise ConfigError(f"tuning.lora.targets={list(settings.targets)}: "
                                  f"{str(exc).splitlines()[0]}") from None
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=settings.lr_scale, domain_head=cfg.domain_head)
        self.lora_config = config
        if structure is not None:
            # `base` is the model peft injected the adapters into (in place), so its
            # blocks are the adapted ones.
            self.prefix = FrozenPrefix(base, settings.from_layer, backbone.hash,
                                       backbone.name, "tuning.lora.from_layer", structure)


def _structure(model: torch.nn.Module, from_layer: int) -> Any:
    """The block list of the plain encoder copy (read before peft wraps its layers)."""
    try:
        structure = derive_structure(model)
    except FamilyError as exc:
        raise ConfigError(f"tuning.lora.from_layer={from_layer}: cannot find this model's "
                          f"blocks ({exc}); use from_layer = 0") from None
    if from_layer >= len(structure.layers):
        raise ConfigError(f"tuning.lora.from_layer={from_layer} is out of range for this "
                          f"backbone ({len(structure.layers)} layers): allowed "
                          f"0..{len(structure.layers) - 1} (the head-only method trains "
                          "no block at all)")
    return structure


def _stores_weights_transposed(model: torch.nn.Module, targets: list[str]) -> bool:
    """True when the targets are GPT-2-style Conv1D layers (weight stored in x out); peft
    needs to be told, and warns on every build when it has to guess."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for name, module in model.named_modules()
               if any(name == t or name.endswith(f".{t}") for t in targets))


@register_builder("lora")
def build_lora(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
               ) -> TunedModel:
    return LoRAModel(backbone, cfg, num_labels, seed)

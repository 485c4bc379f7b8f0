"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the chosen linear layers."""

from __future__ import annotations

import warnings

import torch

from fedtune.config import ConfigError, TuningConfig
from fedtune.models import Backbone
from fedtune.models.families import resolve_lora_targets
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.registry import register_method

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

        # Empty targets: the model's own query/value-like projections (fedtune.models.families).
        targets = resolve_lora_targets(backbone.model, list(cfg.lora_targets))
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            target_modules=targets, lora_dropout=0.0,
                            bias="none")
        # peft draws lora_A at random: seed it so every process builds the same start.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                encoder = get_peft_model(encoder_copy(backbone.model), config)
            except ValueError as exc:
                raise ConfigError(f"tuning.lora_targets={list(cfg.lora_targets)}: "
                                  f"{str(exc).splitlines()[0]}") from None
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=cfg.lora_lr_scale, domain_head=cfg.domain_head)
        self.lora_config = config


@register_method("lora")
def build_lora(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
               ) -> TunedModel:
    return LoRAModel(backbone, cfg, num_labels, seed)

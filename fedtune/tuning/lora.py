"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the chosen linear layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from fedtune.config import ConfigError, TuningConfig, require_positive
from fedtune.models import Backbone
from fedtune.models.families import resolve_lora_targets
from fedtune.tuning.base import EncoderClassifier, TunedModel, encoder_copy
from fedtune.tuning.registry import register_method

# peft calls a transformers method that transformers has deprecated; the warning is about
# peft's code, not the user's, and repeats on every client of every round.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class LoRAConfig:
    """`[tuning.lora]`: rank, scaling numerator and the linear layers that get adapters."""

    r: int = 8
    alpha: int = 16
    # Empty: derived from the backbone's attention projections (query/value-like).
    targets: list[str] = field(default_factory=list)
    # Learning rate of the adapters relative to train.lr (the head's). At the head's SGD
    # rate of 1.0, LoRA diverged on the quickstart (one-class predictions).
    lr_scale: float = 0.02

    def validate(self, prefix: str) -> None:
        for name in ("r", "alpha", "lr_scale"):
            require_positive(f"{prefix}.{name}", getattr(self, name))
        if any(not isinstance(t, str) or not t for t in self.targets):
            raise ConfigError(f"{prefix}.targets must be module names (or [] to derive)")


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
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                            target_modules=targets, lora_dropout=0.0, bias="none",
                            fan_in_fan_out=_stores_weights_transposed(backbone.model, targets))
        # peft draws lora_A at random: seed it so every process builds the same start.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                encoder = get_peft_model(encoder_copy(backbone.model), config)
            except ValueError as exc:
                raise ConfigError(f"tuning.lora.targets={list(settings.targets)}: "
                                  f"{str(exc).splitlines()[0]}") from None
        super().__init__(encoder, backbone.hidden_size, num_labels, cfg.head_hidden,
                         lr_scale=settings.lr_scale, domain_head=cfg.domain_head)
        self.lora_config = config


def _stores_weights_transposed(model: torch.nn.Module, targets: list[str]) -> bool:
    """True when the targets are GPT-2-style Conv1D layers (weight stored in x out); peft
    needs to be told, and warns on every build when it has to guess."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for name, module in model.named_modules()
               if any(name == t or name.endswith(f".{t}") for t in targets))


@register_method("lora", LoRAConfig)
def build_lora(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
               ) -> TunedModel:
    return LoRAModel(backbone, cfg, num_labels, seed)

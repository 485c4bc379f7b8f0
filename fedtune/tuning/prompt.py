"""Soft prompt tuning (Lester et al. 2021) with a classification head.

The prompt is an `nn.Embedding(P, d)` looked up with `arange(P)`: Opacus computes per-sample
gradients for an embedding layer in every grad_sample_mode, whereas a bare `nn.Parameter`
concatenated to the input fails in all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.config import TuningConfig
from fedtune.models import Backbone
from fedtune.tuning.base import ClassificationHead, TunedModel, masked_mean
from fedtune.tuning.registry import register_method


class SoftPrompt(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(init.shape[0], init.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    def forward(self, batch_size: int) -> torch.Tensor:
        length = self.embedding.num_embeddings
        index = torch.arange(length, device=self.embedding.weight.device)
        return self.embedding(index.expand(batch_size, -1).contiguous())


class PromptModel(TunedModel):
    method = "prompt"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> None:
        super().__init__()
        self.backbone = backbone.model
        words = self.backbone.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(seed)
        # Start from real token embeddings: a prompt of random vectors far from the
        # embedding manifold would wreck the pretrained features before any training.
        rows = torch.randint(1000, words.shape[0], (cfg.prompt_length,), generator=generator)
        self.prompt = SoftPrompt(words[rows].detach().clone())
        self.head = ClassificationHead(backbone.hidden_size, num_labels, cfg.head_hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        words = self.backbone.get_input_embeddings()(input_ids)
        prompt = self.prompt(batch)
        embeds = torch.cat([prompt, words], dim=1)
        prompt_mask = torch.ones(batch, prompt.shape[1], dtype=attention_mask.dtype,
                                 device=attention_mask.device)
        mask = torch.cat([prompt_mask, attention_mask], dim=1)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        pooled = masked_mean(hidden[:, prompt.shape[1]:], attention_mask)
        return self.head(pooled)


@register_method("prompt")
def build_prompt(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return PromptModel(backbone, cfg, num_labels, seed)

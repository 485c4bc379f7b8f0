"""Soft prompt tuning (Lester et al. 2021) with a classification head.

The prompt is an `nn.Embedding(P, d)` looked up with `arange(P)`: Opacus computes per-sample
gradients for an embedding layer in every grad_sample_mode, whereas a bare `nn.Parameter`
concatenated to the input fails in all of them.

Placement and init are chosen so the untrained prompt barely disturbs the pretrained
features: the prompt goes right after [CLS] and starts as copies of the [SEP] embedding.
Measured on SpamAssassin (logistic-regression probe on the pooled features, 64 tokens):
no prompt 0.959, prompt before [CLS] from random vocabulary rows 0.942, after [CLS] from
[SEP] 0.954. DP-SGD then has less to repair.

With `layer = L > 0` the prompt is spliced into the hidden states entering block L
instead of into the word embeddings (blocks [0, L) see the input alone, blocks [L, N) see
the prompt too, and the attention mask covers it from L on). Blocks [0, L) then hold
nothing trainable and their states can be cached (fedtune.tuning.prefix_cache). The prompt
starts as copies of the [SEP] token's state entering block L (of the input "[CLS] [SEP]"),
the counterpart at that depth of the layer-0 [SEP] embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.config import ConfigError, TuningConfig
from fedtune.config.methods import PromptConfig as PromptConfig  # its former home
from fedtune.models import Backbone
from fedtune.tuning.base import ClassificationHead, TunedModel, masked_mean
from fedtune.tuning.prefix import FrozenPrefix
from fedtune.tuning.registry import register_builder


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
        settings: PromptConfig = cfg.settings("prompt")
        self.backbone = backbone.model
        words = self.backbone.get_input_embeddings().weight
        tok = backbone.tokenizer
        # Encoders start every input with [CLS]; keep it first so its role is unchanged.
        self.insert_at = 1 if tok.cls_token_id is not None else 0
        anchor = next((t for t in (tok.sep_token_id, tok.eos_token_id) if t is not None), None)
        self.layer = settings.layer
        if self.layer > 0:
            self.prefix = FrozenPrefix(self.backbone, self.layer, backbone.hash,
                                       backbone.name, "tuning.prompt.layer")
            if self.layer >= self.prefix.num_layers:
                # Nothing would read a prompt after the last block: pooling skips it.
                raise ConfigError(f"tuning.prompt.layer={self.layer} is out of range for "
                                  f"this backbone ({self.prefix.num_layers} layers): "
                                  f"allowed 0..{self.prefix.num_layers - 1}")
        if anchor is not None:
            init = self._initial_rows(torch.tensor([anchor] * settings.length), tok)
        else:
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randint(0, words.shape[0], (settings.length,), generator=generator)
            init = self._initial_rows(rows, tok)
        self.prompt = SoftPrompt(init)
        self.prompt_lr_scale = settings.lr_scale
        self.head = ClassificationHead(backbone.hidden_size, num_labels, cfg.head_hidden,
                                       cfg.domain_head)

    def _initial_rows(self, ids: torch.Tensor, tok: Any) -> torch.Tensor:
        """The prompt's start: the rows of token `ids` where the prompt enters (word
        embeddings at layer 0; at layer L each token's state entering block L, computed
        after [CLS] where the tokenizer has one)."""
        words = self.backbone.get_input_embeddings().weight
        if self.prefix is None:
            return words[ids].detach().clone()
        lead = [tok.cls_token_id] if tok.cls_token_id is not None else []
        state: dict[int, torch.Tensor] = {}
        for token in dict.fromkeys(ids.tolist()):
            seq = torch.tensor([lead + [token]], device=words.device)
            state[token] = self.prefix.states(seq, torch.ones_like(seq))[0, -1]
        return torch.stack([state[t] for t in ids.tolist()]).detach().clone()

    def param_groups(self, lr: float) -> list[dict]:
        return [
            {"params": list(self.prompt.parameters()), "lr": lr * self.prompt_lr_scale},
            {"params": list(self.head.parameters()), "lr": lr},
        ]

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with the prompt spliced in, and the matching attention mask."""
        words = self.backbone.get_input_embeddings()(input_ids)
        return self.splice(words, attention_mask)

    def splice(self, hidden: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` (word embeddings, or the states entering block `layer`) with the
        prompt spliced in after position `insert_at`, and the matching attention mask."""
        batch, k = hidden.shape[0], self.insert_at
        prompt = self.prompt(batch)
        p = prompt.shape[1]
        spliced = torch.cat([hidden[:, :k], prompt, hidden[:, k:]], dim=1)
        prompt_mask = torch.ones(batch, p, dtype=attention_mask.dtype,
                                 device=attention_mask.device)
        mask = torch.cat([attention_mask[:, :k], prompt_mask, attention_mask[:, k:]], dim=1)
        return spliced, mask

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden states (prompt positions included)."""
        k, p = self.insert_at, self.prompt.embedding.num_embeddings
        # Pool over the input's own tokens only, as the sentence encoder was trained to.
        hidden = torch.cat([hidden[:, :k], hidden[:, k + p:]], dim=1)
        return self.head(masked_mean(hidden, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            return self.forward_from(self.prefix.states(input_ids, attention_mask),
                                     attention_mask)
        embeds, mask = self.embed_inputs(input_ids, attention_mask)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.classify(hidden, attention_mask)

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        if self.prefix is None:
            return super().forward_from(hidden, attention_mask)
        spliced, mask = self.splice(hidden, attention_mask)
        return self.classify(self.prefix.suffix(spliced, mask), attention_mask)


@register_builder("prompt")
def build_prompt(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return PromptModel(backbone, cfg, num_labels, seed)

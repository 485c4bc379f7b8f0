"""Cut a pretrained transformer into the parts of split learning.

head = the embedding stage + layers [0, k); body = layers [k, L) + the final norm; the
tail (pooling + classifier) belongs to the tuning method, not to the backbone.

Each architecture family registers how its embedding stage, attention mask and layer call
look, so the composed parts compute exactly what the model's own `forward` computes (the
split-vs-unsplit equality test relies on it). Only the frozen pretrained modules are
touched here; nothing is copied: the parts are views of the process-wide backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from fedtune.config import ConfigError


class SplitError(ConfigError):
    """The backbone cannot be cut as configured (a config error: it names the field)."""


@dataclass(frozen=True)
class Family:
    """How one architecture family runs its stages.

    layers(model) -> the ordered transformer blocks;
    embed(model, inputs_embeds) -> the embedding stage's output (positions, norm, ...);
    mask(model, hidden, mask_2d) -> whatever the blocks take as attention mask;
    block(layer, hidden, mask) -> the block's output hidden states;
    final(model, hidden) -> the post-stack norm (identity where there is none).
    """

    layers: Callable[[PreTrainedModel], nn.ModuleList]
    embed: Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]
    mask: Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], Any]
    block: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
    final: Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]


_FAMILIES: dict[str, Family] = {}


def register_family(model_type: str, family: Family) -> None:
    if model_type in _FAMILIES:
        raise ValueError(f"split family {model_type!r} is registered twice")
    _FAMILIES[model_type] = family


def splittable_types() -> list[str]:
    return sorted(_FAMILIES)


def _bert_mask(model: PreTrainedModel, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    # The same mask builder BertModel.forward uses, so sdpa/eager choices match it.
    build = create_causal_mask if model.config.is_decoder else create_bidirectional_mask
    kwargs = {"cache": None} if model.config.is_decoder else {}
    return build(config=model.config, inputs_embeds=hidden, attention_mask=mask, **kwargs)


register_family("bert", Family(
    layers=lambda m: m.encoder.layer,
    embed=lambda m, e: m.embeddings(inputs_embeds=e),
    mask=_bert_mask,
    block=lambda layer, h, mask: layer(h, mask),
    final=lambda m, h: h,
))


def _gpt2_positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _gpt2_embed(model: PreTrainedModel, embeds: torch.Tensor) -> torch.Tensor:
    return model.drop(embeds + model.wpe(_gpt2_positions(embeds)))


def _gpt2_mask(model: PreTrainedModel, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    positions = _gpt2_positions(hidden)
    causal = create_causal_mask(config=model.config, inputs_embeds=hidden,
                                attention_mask=mask, cache=None, position_ids=positions)
    return causal, positions


register_family("gpt2", Family(
    layers=lambda m: m.h,
    embed=_gpt2_embed,
    mask=_gpt2_mask,
    block=lambda layer, h, mask: layer(h, None, mask[0], position_ids=mask[1]),
    final=lambda m, h: m.ln_f(h),
))


class SplitBackbone:
    """The frozen backbone seen as head layers [0, k) and body layers [k, L)."""

    def __init__(self, model: PreTrainedModel, cut_layer: int) -> None:
        model_type = getattr(model.config, "model_type", "")
        if model_type not in _FAMILIES:
            raise SplitError(
                f"split mode does not know how to cut a {model_type!r} model; splittable "
                f"model types: {', '.join(splittable_types())}")
        self.model = model
        self.family = _FAMILIES[model_type]
        self.num_layers = len(self.family.layers(model))
        if not 0 <= cut_layer < self.num_layers:
            raise SplitError(
                f"split.cut_layer={cut_layer} is out of range for this backbone "
                f"({self.num_layers} layers): allowed 0..{self.num_layers - 1}, so the "
                "server body keeps at least one layer")
        self.cut_layer = cut_layer

    def embed(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.family.embed(self.model, inputs_embeds)

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The client's share: embedded inputs through layers [0, k)."""
        return self._run(hidden, mask, 0, self.cut_layer)

    def body(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The server's share: cut-layer states through layers [k, L) and the final norm."""
        out = self._run(hidden, mask, self.cut_layer, self.num_layers)
        return self.family.final(self.model, out)

    def head_modules(self) -> list[nn.Module]:
        """The frozen pretrained modules the client runs (embedding stage + k layers)."""
        layers = list(self.family.layers(self.model))[:self.cut_layer]
        return [self.model.get_input_embeddings(), *layers]

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, end: int
             ) -> torch.Tensor:
        if start == end:
            return hidden
        block_mask = self.family.mask(self.model, hidden, mask)
        for layer in list(self.family.layers(self.model))[start:end]:
            hidden = self.family.block(layer, hidden, block_mask)
        return hidden

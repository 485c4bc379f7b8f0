"""A backbone's frozen prefix: blocks [0, L) that hold no trainable tensor.

When every trainable tensor of a method sits at or above block L (a prompt spliced in at
block L, LoRA or BitFit on blocks >= L, a head on the final states), blocks [0, L) compute
the same hidden states for an example in every step and round. `FrozenPrefix` runs a
backbone in two parts, `states` (embedding stage + blocks [0, L), no graph) and `suffix`
(blocks [L, N) + the final norm), with the arguments the model's own forward passes to its
blocks (`fedtune.models.families.LayerInputs`), so a method can train from cached states
(`fedtune.tuning.prefix_cache`). Built once per tuned model, it checks that the two parts
compose to the model's own forward, so a family whose blocks need arguments the capture
misses fails at build with one line instead of training on wrong states.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.config import ConfigError
from fedtune.config.methods import FromLayerSettings as FromLayerSettings  # its former home
from fedtune.models.families import (
    FamilyError,
    LayerInputs,
    Structure,
    capture_layer_inputs,
    derive_structure,
)


class FrozenPrefix:
    """Blocks [0, `layer`) of `model` as a frozen stage, the rest as the trainable suffix.

    `model` is the module whose blocks run (the shared backbone, or a method's own encoder
    copy with adapters in blocks >= layer); `backbone_hash` names the frozen weights the
    cached states depend on. Not an `nn.Module`: it only holds references to modules the
    tuned model owns, so nothing is registered twice."""

    def __init__(self, model: nn.Module, layer: int, backbone_hash: str, backbone_name: str,
                 field: str, structure: Structure | None = None) -> None:
        try:
            self.structure = structure or derive_structure(model)
        except FamilyError as exc:
            raise ConfigError(f"{field}={layer}: cannot find the blocks of this model to "
                              f"split at ({exc})") from None
        self.model = model
        self.num_layers = len(self.structure.layers)
        # layer == num_layers (the head-only method) leaves only the final norm after it.
        if not 0 < layer <= self.num_layers:
            raise ConfigError(f"{field}={layer} is out of range for this backbone "
                              f"({self.num_layers} layers): allowed 1..{self.num_layers}")
        self.layer = layer
        self.backbone_hash = backbone_hash
        self.backbone_name = backbone_name
        self.field = field
        self._check_against_forward()

    def _inputs(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> LayerInputs:
        return capture_layer_inputs(self.model, self.structure, inputs_embeds, mask)

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block `layer` (no autograd graph: nothing before it
        trains)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        inputs = self._inputs(embeds, attention_mask)
        hidden = inputs.hidden
        for block in list(self.structure.layers)[:self.layer]:
            hidden = inputs.call(block, hidden)
        return hidden

    def suffix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Blocks [layer, N) and the final norm on `hidden` (B x T' x d), whose positions
        `attention_mask` (B x T') covers; returns the last hidden states."""
        blocks = list(self.structure.layers)[self.layer:]
        if blocks:
            # The blocks' other inputs depend on shape, dtype and mask only: capture them on
            # a zero input without a graph (the embedding stage is cheap next to a block).
            with torch.no_grad():
                inputs = self._inputs(torch.zeros_like(hidden), attention_mask)
            for block in blocks:
                hidden = inputs.call(block, hidden)
        norm = self.structure.final_norm
        return hidden if norm is None else norm(hidden)

    def key(self) -> dict[str, object]:
        """What the states depend on besides the token rows (fedtune.tuning.prefix_cache)."""
        return {"backbone": self.backbone_hash, "tokenizer": self.backbone_name,
                "layer": self.layer, "num_layers": self.num_layers}

    @torch.no_grad()
    def _check_against_forward(self) -> None:
        words = self.model.get_input_embeddings().weight
        start = max(0, min(1000, words.shape[0] - 6))
        ids = torch.arange(start, start + 6, device=words.device).unsqueeze(0)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        expected = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = self.suffix(self.states(ids, mask), mask)
        keep = mask[0].bool()
        if not torch.allclose(got[:, keep], expected[:, keep], rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"{self.field}={self.layer}: running this {self.structure.model_type!r} "
                "model from a middle layer does not reproduce its forward; use layer 0")


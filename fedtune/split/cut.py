"""Cut a pretrained transformer into the parts of split learning.

head = the embedding stage + layers [0, k) (client); body = layers [k, L - t) (server); tail =
layers [L - t, L) + the final norm + the model's own output head where it has one (a causal
LM's LM head) (client). The final norm runs on the client whenever the tail runs anything of
the backbone; a classifier with t = 0 has an empty tail, and its body ends with the norm as
it always did. What reads the tail's output (pooling + classifier, or dropping the prompt's
positions of the next-token logits) belongs to the tuning method (`fedtune.split.model`).

A decoder's causal mask is the model's own: each part runs its blocks with the arguments the
model's forward builds for the mask it is given (causal, plus padding), so no part lets a
position see a later one.

The block list, the final norm and the blocks' call arguments come from the model itself
(`fedtune.models.families`): the arguments are captured from the model's own forward at its
first block, so the composed parts compute exactly what `forward` computes (the
split-vs-unsplit equality tests rely on it, and each cut is checked against the model's
forward once when it is built). Only the frozen pretrained modules are touched here;
nothing is copied: the parts are views of the process-wide backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedtune.config import ConfigError
from fedtune.models.families import (
    FamilyError,
    LayerInputs,
    capture_layer_inputs,
    derive_structure,
    supported_families,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SplitError(ConfigError):
    """The backbone cannot be cut as configured (a config error: it names the field)."""


def splittable_types() -> list[str]:
    return supported_families()


def _after_pruning(model: PreTrainedModel) -> str:
    # A cut counts the layers model.prune_layers kept; say so when that is not all of them.
    original = getattr(model.config, "fedtune_layers_kept", None)
    return " after model.prune_layers" if original is not None else ""


class SplitBackbone:
    """The frozen backbone seen as head layers [0, k), body layers [k, L - t) and tail
    layers [L - t, L) (+ final norm + output head)."""

    def __init__(self, model: PreTrainedModel, cut_layer: int, tail_layers: int = 0) -> None:
        model_type = getattr(model.config, "model_type", "")
        unsupported = SplitError(
            f"split mode does not know how to cut a {model_type!r} model; supported "
            f"families: {', '.join(splittable_types())}")
        try:
            structure = derive_structure(model)
        except FamilyError:
            raise unsupported from None
        if not structure.supported:
            raise unsupported
        self.model = model
        self.structure = structure
        self.num_layers = len(structure.layers)
        if not 0 <= tail_layers < self.num_layers:
            raise SplitError(
                f"split.tail_layers={tail_layers} is out of range for this backbone "
                f"({self.num_layers} layers{_after_pruning(model)}): allowed "
                f"0..{self.num_layers - 1}, so the server body keeps at least one layer")
        body_end = self.num_layers - tail_layers
        tail_note = f", the last {tail_layers} in the tail" if tail_layers else ""
        if not 0 <= cut_layer < body_end:
            raise SplitError(
                f"split.cut_layer={cut_layer} is out of range for this backbone "
                f"({self.num_layers} layers{_after_pruning(model)}{tail_note}): allowed "
                f"0..{body_end - 1}, so the server body keeps at least one layer")
        self.cut_layer = cut_layer
        self.tail_layers = tail_layers
        self.body_end = body_end
        # The model's own output layer (a causal LM's LM head; None for an encoder loaded
        # without one): the tail ends with it, so the client computes the logits.
        self.output_head = model.get_output_embeddings()
        # The final norm runs where the last block runs when the tail has blocks; with an
        # output head it belongs to the tail too (LM head after norm, both on the client).
        self.norm_in_tail = tail_layers > 0 or self.output_head is not None
        self._check_against_forward()

    def embed(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The embedding stage's output (positions, norm, ...) as the model computes it."""
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                        device=inputs_embeds.device)
        return self._inputs(inputs_embeds, attention_mask).hidden

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The client's share before the cut: embedded inputs through layers [0, k)."""
        return self._run(hidden, mask, 0, self.cut_layer)

    def body(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The server's share: cut-layer states through layers [k, L - t) (and the final
        norm when the tail is empty)."""
        out = self._run(hidden, mask, self.cut_layer, self.body_end)
        return out if self.norm_in_tail else self._norm(out)

    def tail(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The client's share after the body: layers [L - t, L), the final norm and the
        output head (each where it belongs to the tail). A causal LM's tail returns the
        next-token logits of every position; an encoder's the last hidden states."""
        out = self._run(hidden, mask, self.body_end, self.num_layers)
        if not self.norm_in_tail:
            return out
        out = self._norm(out)
        return out if self.output_head is None else self.output_head(out)

    def _norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.structure.final_norm
        return hidden if norm is None else norm(hidden)

    def _inputs(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> LayerInputs:
        return capture_layer_inputs(self.model, self.structure, inputs_embeds, mask)

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, end: int
             ) -> torch.Tensor:
        if start == end:
            return hidden
        # The blocks' other inputs depend on the shape, dtype and mask only: capture them
        # on a zero input (the embedding stage is cheap next to one block) without a graph.
        with torch.no_grad():
            inputs = self._inputs(torch.zeros_like(hidden), mask)
        for layer in list(self.structure.layers)[start:end]:
            hidden = inputs.call(layer, hidden)
        return hidden

    @torch.no_grad()
    def _check_against_forward(self) -> None:
        """head -> body -> tail must be the model's own forward (its logits where it has an
        output head). A family whose blocks take per-layer arguments, or a transformers
        upgrade that changes the forward, fails here with one line, not later as silently
        wrong activations."""
        embeds = self.model.get_input_embeddings().weight[:6].unsqueeze(0).clone()
        mask = torch.ones(1, 6, dtype=torch.long, device=embeds.device)
        mask[0, -2:] = 0
        out = self.model(inputs_embeds=embeds, attention_mask=mask)
        expected = out.last_hidden_state if self.output_head is None else out.logits
        got = self.tail(self.body(self.head(self.embed(embeds, mask), mask), mask), mask)
        keep = mask[0].bool()
        if not torch.allclose(got[:, keep], expected[:, keep], rtol=1e-4, atol=1e-5):
            raise SplitError(
                f"split mode cannot reproduce this {self.structure.model_type!r} model's "
                f"forward when cut at split.cut_layer={self.cut_layer} "
                + (f"with split.tail_layers={self.tail_layers} " if self.tail_layers else "")
                + "(installed transformers changed its blocks' inputs?); supported "
                f"families: {', '.join(splittable_types())}")

"""SLaSh (Gupta et al. 2023, "Jointly Reparametrized Multi-Layer Adaptation for Efficient
and Private Tuning"): one trainable vector z, shared by all layers through fixed random
projections.

Layer l adds the shift z @ W_l to the output of a dense sub-layer, before its residual
LayerNorm. W_l (z_size x width) is drawn N(0, 1)/sqrt(z_size) from `tuning.slash.seed`, so
every client regenerates the same projections; they are buffers, never trained and never
sent. Only z and the head cross the wire.

z is held as a one-row `nn.Embedding` looked up per example: Opacus then computes z's
per-sample gradients with its embedding sampler, as for the soft prompt. The shifts are
added by forward hooks that exist only inside `forward`, so the process-wide frozen
backbone that other models share is never left modified.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.config import ConfigError, TuningConfig
from fedtune.config.methods import SlashConfig as SlashConfig  # its former home
from fedtune.models import Backbone
from fedtune.models.families import FamilyError, derive_structure, linear_shape
from fedtune.tuning.base import ClassificationHead, TunedModel, masked_mean
from fedtune.tuning.registry import register_builder


class SharedVector(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1, size)
        nn.init.zeros_(self.embedding.weight)  # start as the unmodified backbone

    def forward(self, batch_size: int) -> torch.Tensor:
        index = torch.zeros(batch_size, dtype=torch.long, device=self.embedding.weight.device)
        return self.embedding(index)


def place_shifts(model: TunedModel, backbone: Backbone, settings: SlashConfig) -> None:
    """SLaSh's parts on `model` (whose `backbone` is `backbone.model`): the sub-layers the
    shifts enter (`model._targets`), their fixed projections (buffers `proj_i`, regenerated
    from the seed by every client) and the shared vector `model.z`."""
    try:
        structure = derive_structure(model.backbone)
        model._targets = [structure.sublayer(layer, settings.position)
                          for layer in structure.layers]
    except FamilyError as exc:
        raise ConfigError(f"tuning.method='slash' cannot place its shifts in "
                          f"{backbone.name!r}: {exc}") from None
    generator = torch.Generator().manual_seed(settings.seed)
    for i, target in enumerate(model._targets):
        width = linear_shape(target)[1]  # type: ignore[index]
        proj = torch.randn(settings.size, width, generator=generator)
        model.register_buffer(f"proj_{i}", proj / settings.size**0.5, persistent=False)
    model.z = SharedVector(settings.size)


class SlashModel(TunedModel):
    method = "slash"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, num_labels: int) -> None:
        super().__init__()
        settings: SlashConfig = cfg.settings("slash")
        self.backbone = backbone.model
        place_shifts(self, backbone, settings)
        self.head = ClassificationHead(backbone.hidden_size, num_labels, cfg.head_hidden,
                                       cfg.domain_head)
        self.lr_scale = settings.lr_scale

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.z.parameters()), "lr": lr * self.lr_scale},
                {"params": list(self.head.parameters()), "lr": lr}]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        z = self.z(input_ids.shape[0])
        handles = []
        for i, target in enumerate(self._targets):
            shift = (z @ getattr(self, f"proj_{i}")).unsqueeze(1)
            handles.append(target.register_forward_hook(
                lambda _m, _inp, out, shift=shift: out + shift))
        try:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return self.head(masked_mean(hidden.last_hidden_state, attention_mask))


@register_builder("slash")
def build_slash(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                ) -> TunedModel:
    return SlashModel(backbone, cfg, num_labels)

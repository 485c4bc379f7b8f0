"""What every tuning method produces: a module over a frozen backbone with a few named
trainable tensors, which are the only thing federated."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fedtune.tuning.prefix import FrozenPrefix


class ClassificationHead(nn.Module):
    """Mean-pooled hidden states -> logits. Zero-initialised output layer, so the untrained
    model predicts uniformly and every gain is learned.

    The pooled vector is standardised per example first (LayerNorm without parameters: no
    privacy cost). Sentence embeddings share a large common direction; without this, noisy
    DP-SGD steps on the head are badly conditioned and accuracy swings between rounds.

    With `domain=True` a second, zero-initialised linear layer scores target vs source
    domain on the same standardised features. Its input is detached: the domain loss trains
    that layer only, never the features the task depends on. The forward still returns the
    task logits alone (what Opacus and evaluation expect); the domain logit of the last
    forward is kept in `last_domain_logit`."""

    def __init__(self, hidden_size: int, num_labels: int, hidden: int = 0,
                 domain: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        layers: list[nn.Module] = []
        width = hidden_size
        if hidden > 0:
            layers += [nn.Linear(hidden_size, hidden), nn.Tanh()]
            width = hidden
        out = nn.Linear(width, num_labels)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)
        self.domain: nn.Linear | None = None
        if domain:
            self.domain = nn.Linear(hidden_size, 1)
            nn.init.zeros_(self.domain.weight)
            nn.init.zeros_(self.domain.bias)
        self.last_domain_logit: torch.Tensor | None = None

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        features = self.norm(pooled)
        if self.domain is not None:
            self.last_domain_logit = self.domain(features.detach()).squeeze(-1)
        return self.net(features)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is 1 (the sentence-transformers pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TunedModel(nn.Module):
    """Base for all methods. Subclasses set `self.backbone` (frozen) and trainable modules,
    and implement `forward(input_ids, attention_mask) -> logits`."""

    method: str = ""
    # Keep the (shared, frozen) backbone in eval mode while training. Methods that put
    # trainable layers inside their own encoder copy turn this off: Opacus only records
    # activations of modules in training mode.
    backbone_eval_in_training: bool = True
    # Set by methods whose trainable tensors all sit at or above a block L > 0: blocks
    # [0, L) then give the same states in every step, and `forward_from` trains from them
    # (fedtune.tuning.prefix_cache). None: the method trains something in every block.
    prefix: FrozenPrefix | None = None

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        """Logits from the hidden states entering block `prefix.layer` (what
        `prefix.states` computes); equal to `forward` on the same rows."""
        raise NotImplementedError(f"tuning.method={self.method!r} has no frozen prefix")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The federated tensors, in a fixed order (parameter registration order)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` (name -> value, e.g. `DeltaSpec.unflatten(vector)`) into this
        model's trainable tensors, in place: the one way a federated vector or a saved
        state enters a model (global vector before training and evaluation, a checkpoint
        or an exported state)."""
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.get_parameter(name).copy_(tensor)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups; methods whose tensors live on another scale than
        the head override this to give them their own learning rate."""
        return [{"params": list(self.trainable_state().values()), "lr": lr}]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_state().values())

    def train(self, mode: bool = True) -> TunedModel:
        super().train(mode)
        # The frozen backbone always runs deterministically (no dropout): its weights
        # never change, and dropout noise would only blur the signal the tensors learn from.
        backbone = getattr(self, "backbone", None)
        if backbone is not None and self.backbone_eval_in_training:
            backbone.eval()
        return self



def pooled_head_from(prefix: FrozenPrefix, head: nn.Module, hidden: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """`head` on the mean-pooled output of the blocks above `prefix`, from the states
    entering them: `forward_from` of the methods that classify the encoder's output."""
    return head(masked_mean(prefix.suffix(hidden, attention_mask), attention_mask))


class EncoderClassifier(TunedModel):
    """A tuned copy of the encoder + head on its mean-pooled output. For methods that change
    the encoder itself (LoRA layers, trainable biases): they get their own copy, so the
    process-wide frozen backbone that other models share is never modified."""

    backbone_eval_in_training = False

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int,
                 head_hidden: int, lr_scale: float = 1.0, domain_head: bool = False) -> None:
        super().__init__()
        _disable_dropout(encoder)
        self.backbone = encoder
        self.head = ClassificationHead(hidden_size, num_labels, head_hidden, domain_head)
        self.lr_scale = lr_scale

    def param_groups(self, lr: float) -> list[dict]:
        encoder = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"params": encoder, "lr": lr * self.lr_scale},
                {"params": list(self.head.parameters()), "lr": lr}]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(masked_mean(hidden.last_hidden_state, attention_mask))

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        if self.prefix is None:
            return super().forward_from(hidden, attention_mask)
        return pooled_head_from(self.prefix, self.head, hidden, attention_mask)


def _disable_dropout(module: nn.Module) -> None:
    """Training mode without dropout: zero every dropout module and the attention dropout
    probability that transformers' attention functions read from `self.dropout_prob`."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if hasattr(sub, "dropout_prob"):
            sub.dropout_prob = 0.0


def encoder_copy(model: nn.Module) -> nn.Module:
    """A private copy of the frozen encoder for methods that modify it. BERT's pooler is
    dropped: its output is never used (the head pools itself), and its parameters would get
    no gradient, which Opacus rejects."""
    copy_ = copy.deepcopy(model)
    if getattr(copy_, "pooler", None) is not None:
        copy_.pooler = None
    return copy_

"""The client's side of a split prompt model: head (embeddings + prompt + first k layers),
tail (pooling + classifier) and, for local-loss updates, an auxiliary classifier.

It is a training view of a `PromptModel`: it shares that model's prompt and classifier
tensors (same names, same order), so its deltas are the prompt method's deltas and the
server evaluates, checkpoints and exports them as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.split.cut import SplitBackbone
from fedtune.tuning.base import ClassificationHead, masked_mean
from fedtune.tuning.prompt import PromptModel


class SplitPromptModel(PromptModel):
    def __init__(self, tuned: PromptModel, split: SplitBackbone,
                 aux: ClassificationHead | None = None) -> None:
        # Not PromptModel.__init__: every tensor is taken over from `tuned`, none is new.
        nn.Module.__init__(self)
        self.backbone = tuned.backbone
        self.prompt = tuned.prompt
        self.head = tuned.head  # the tail's classifier; the name keeps the spec's names
        self.insert_at = tuned.insert_at
        self.prompt_lr_scale = tuned.prompt_lr_scale
        self.aux = aux
        self.split = split

    def param_groups(self, lr: float) -> list[dict]:
        groups = super().param_groups(lr)
        if self.aux is not None:
            groups.append({"params": list(self.aux.parameters()), "lr": lr})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # The auxiliary classifier stays on the client: it is never federated.
        return {n: p for n, p in super().trainable_state().items() if not n.startswith("aux.")}

    def cut(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smashed data: the cut-layer hidden states, and the mask the body needs."""
        embeds, mask = self.embed_inputs(input_ids, attention_mask)
        return self.split.head(self.split.embed(embeds, mask), mask), mask

    def tail(self, body_output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(body_output, attention_mask)

    def aux_logits(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The local loss's logits. Pooled over the prompt positions too: with k = 0 those
        are the only positions the prompt reaches before the cut."""
        if self.aux is None:
            raise RuntimeError("this split model has no auxiliary head (local-loss is off)")
        return self.aux(masked_mean(smashed, mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        smashed, mask = self.cut(input_ids, attention_mask)
        return self.tail(self.split.body(smashed, mask), attention_mask)

    def set_phase(self, local_loss: bool | None) -> None:
        """Which of tail / aux head trains this step (None: both). The idle one is frozen
        and its stale gradients dropped: DP-SGD needs a per-sample gradient for every
        trainable tensor, and the optimizer would otherwise re-apply an old gradient."""
        if local_loss is None:
            for part in (self.head, self.aux):
                if part is not None:
                    part.requires_grad_(True)
            return
        idle, active = (self.head, self.aux) if local_loss else (self.aux, self.head)
        if active is not None:
            active.requires_grad_(True)
        if idle is not None:
            for p in idle.parameters():
                p.requires_grad_(False)
                p.grad = None
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None

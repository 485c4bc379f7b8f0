"""The client's side of a split prompt model: head (embeddings + prompt + first k layers),
tail (last layers + final norm + output) and, for local-loss updates, an auxiliary
classifier.

A view is a training view of a tuned model: it shares that model's tensors (same names, same
order), so its deltas are the method's deltas and the server evaluates, checkpoints and
exports them as usual. Which view a tuned model gets is a registry keyed by its class
(`register_split_view`): the view asks its model how the inputs are embedded (the prompt's
place) and how the tail's output is read (a classifier pools and classifies; a causal LM's
tail ends in its LM head, and the prompt's positions are dropped), never the task's name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedtune.split.cut import SplitBackbone, SplitError
from fedtune.tuning import TunedModel
from fedtune.tuning.base import ClassificationHead, masked_mean
from fedtune.tuning.causal_lm import CausalLMPrompt
from fedtune.tuning.prompt import PromptModel


class SplitParts:
    """What every split view adds to its tuned model's class (listed first among the
    view's bases, so its `forward` is the split one). Subclasses set `split`, `aux` and
    `tail_module` (the tail's trainable module, or None) and implement `read_out` and
    `full_model_output`; the tuned model's class gives `embed_inputs(ids, mask) ->
    (embeddings with the prompt, their mask)`."""

    split: SplitBackbone
    aux: ClassificationHead | None
    tail_module: nn.Module | None

    def read_out(self, tail_output: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
        """The task's output from the tail's (the criterion's input)."""
        raise NotImplementedError

    def full_model_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> torch.Tensor:
        """The unsplit model's output with every backbone weight in the graph (the FLOPs of
        federated full fine-tuning, `fedtune.split.flops`)."""
        raise NotImplementedError

    def cut(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smashed data: the cut-layer hidden states, and the mask of every position they
        hold (the prompt's included), which the body and the tail need."""
        embeds, mask = self.embed_inputs(input_ids, attention_mask)  # type: ignore[attr-defined]
        return self.split.head(self.split.embed(embeds, mask), mask), mask

    def tail(self, body_output: torch.Tensor, full_mask: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
        """The client's share after the body: tail layers, final norm, output head (the
        split's tail), then the method's read-out. `full_mask` covers every position
        (`cut`'s mask); `attention_mask` the input's own."""
        return self.read_out(self.split.tail(body_output, full_mask), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        smashed, mask = self.cut(input_ids, attention_mask)
        return self.tail(self.split.body(smashed, mask), mask, attention_mask)

    def aux_logits(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The local loss's logits. Pooled over the prompt positions too: with k = 0 those
        are the only positions the prompt reaches before the cut."""
        if self.aux is None:
            raise RuntimeError("this split model has no auxiliary head (local-loss is off)")
        return self.aux(masked_mean(smashed, mask))

    def set_phase(self, local_loss: bool | None) -> None:
        """Which of tail / aux head trains this step (None: both). The idle one is frozen
        and its stale gradients dropped: DP-SGD needs a per-sample gradient for every
        trainable tensor, and the optimizer would otherwise re-apply an old gradient."""
        if local_loss is None:
            for part in (self.tail_module, self.aux):
                if part is not None:
                    part.requires_grad_(True)
            return
        idle, active = ((self.tail_module, self.aux) if local_loss
                        else (self.aux, self.tail_module))
        if active is not None:
            active.requires_grad_(True)
        if idle is not None:
            for p in idle.parameters():
                p.requires_grad_(False)
                p.grad = None
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None

    def _with_aux(self, groups: list[dict], lr: float) -> list[dict]:
        if self.aux is not None:
            groups.append({"params": list(self.aux.parameters()), "lr": lr})
        return groups

    def _without_aux(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The auxiliary classifier stays on the client: it is never federated.
        return {n: p for n, p in state.items() if not n.startswith("aux.")}


# A view for split training is made for a `TunedModel` by the factory registered for its class.
ViewFactory = Callable[[TunedModel, SplitBackbone, "ClassificationHead | None"], TunedModel]
_VIEWS: dict[type, ViewFactory] = {}


def register_split_view(model_class: type) -> Callable[[ViewFactory], ViewFactory]:
    def register(factory: ViewFactory) -> ViewFactory:
        if model_class in _VIEWS:
            raise ValueError(f"a split view for {model_class.__name__} is registered twice")
        _VIEWS[model_class] = factory
        return factory
    return register


def split_view_of(tuned: TunedModel, split: SplitBackbone,
                  aux: ClassificationHead | None = None) -> TunedModel:
    """The split training view of `tuned` (its tensors, cut as `split`)."""
    for cls in type(tuned).__mro__:
        if cls in _VIEWS:
            return _VIEWS[cls](tuned, split, aux)
    raise SplitError(f"split mode has no view of a {type(tuned).__name__} "
                     f"(tuning.method={tuned.method!r})")


@register_split_view(PromptModel)
class SplitPromptModel(SplitParts, PromptModel):
    """A classifier's prompt model: the tail's output is read by pooling + classifier."""

    def __init__(self, tuned: PromptModel, split: SplitBackbone,
                 aux: ClassificationHead | None = None) -> None:
        # Not PromptModel.__init__: every tensor is taken over from `tuned`, none is new.
        nn.Module.__init__(self)
        if tuned.prefix is not None:
            raise SplitError("split mode needs the prompt at the word embeddings "
                             "(tuning.prompt.layer=0)")
        self.backbone = tuned.backbone
        self.prompt = tuned.prompt
        self.head = tuned.head  # the tail's classifier; the name keeps the spec's names
        self.insert_at = tuned.insert_at
        self.prompt_lr_scale = tuned.prompt_lr_scale
        self.aux = aux
        self.split = split

    @property
    def tail_module(self) -> nn.Module:
        return self.head

    def param_groups(self, lr: float) -> list[dict]:
        return self._with_aux(super().param_groups(lr), lr)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self._without_aux(super().trainable_state())

    def read_out(self, tail_output: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
        return self.classify(tail_output, attention_mask)

    def full_model_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask
                               ).last_hidden_state
        return self.head(masked_mean(hidden, attention_mask))


@register_split_view(CausalLMPrompt)
class SplitCausalLMPrompt(SplitParts, CausalLMPrompt):
    """A causal LM's prompt model: the tail ends in the LM head (next-token logits of every
    position); the read-out drops the prompt's positions. Nothing in the tail trains: the
    prompt is the only federated tensor, and the tail's weights are the frozen backbone's."""

    tail_module = None

    def __init__(self, tuned: CausalLMPrompt, split: SplitBackbone,
                 aux: ClassificationHead | None = None) -> None:
        nn.Module.__init__(self)
        if aux is not None:
            raise SplitError("split.local_loss_fraction > 0 (an auxiliary classifier) is "
                             "not built for a causal LM's split view")
        if split.output_head is None:
            raise SplitError("a causal LM's split view needs a backbone loaded with its LM "
                             "head (task.kind='causal_lm')")
        self.backbone = tuned.backbone
        self.prompt = tuned.prompt
        self.prompt_lr_scale = tuned.prompt_lr_scale
        self.aux = None
        self.split = split

    def read_out(self, tail_output: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
        return self.input_positions(tail_output)

    def full_model_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).logits

"""The tuning methods built for a causal-LM task (`[task] kind = "causal_lm"`): the frozen
decoder keeps its own LM head, the forward returns next-token logits [B, T, V] aligned with
the input positions, and nothing but the method's tensors is federated (no classification
head in the delta).

- LoRA: peft adapters on a private copy of the CausalLM (the process-wide frozen backbone
  that other models share is never modified); targets derived as for a classifier
  (`fedtune.models.families`). With `tuning.lora.from_layer = L > 0` the adapters sit in
  blocks >= L only, and the decoder under the LM head (`base_model`: LlamaModel, GPT2Model)
  is a frozen prefix (`fedtune.tuning.prefix`): `forward_from` runs blocks >= L, the final
  norm and the LM head on cached states, with the masks and (rotary) positions the model's
  own forward gives its blocks.
- Soft prompt: P trainable embeddings prepended to the word embeddings through
  `inputs_embeds`; the logits of the prompt positions are dropped, so the loss never scores
  them. An `nn.Embedding` looked up with `arange(P)`, as for a classifier: the form Opacus
  computes per-sample gradients for.
- SLaSh: one shared vector z, shifted into every block's chosen sub-layer output through
  fixed seeded projections (`fedtune.tuning.slash`), on the shared frozen decoder.
"""

from __future__ import annotations

import copy

import torch

from fedtune.config import ConfigError, TuningConfig
from fedtune.models import Backbone
from fedtune.models.families import resolve_lora_targets
from fedtune.tuning.base import TunedModel, _disable_dropout
from fedtune.tuning.lora import _stores_weights_transposed, _structure
from fedtune.tuning.prefix import FrozenPrefix
from fedtune.tuning.prompt import SoftPrompt
from fedtune.tuning.registry import register_builder
from fedtune.tuning.slash import place_shifts

KIND = "causal_lm"


class CausalLMLoRA(TunedModel):
    method = "lora"
    # The adapters sit inside this model's own copy: Opacus records activations only of
    # modules in training mode (dropout is off in the copy).
    backbone_eval_in_training = False

    def __init__(self, backbone: Backbone, cfg: TuningConfig, seed: int) -> None:
        super().__init__()
        # peft is imported here: it costs ~2 s of CPU in every process that imports the
        # method registry, LoRA run or not.
        from peft import LoraConfig, get_peft_model

        settings = cfg.settings("lora")
        targets = resolve_lora_targets(backbone.model, list(settings.targets),
                                       field="tuning.lora.targets")
        base = copy.deepcopy(backbone.model)
        _disable_dropout(base)
        layers, structure = {}, None
        if settings.from_layer > 0:
            # The decoder's blocks (read before peft wraps its layers); peft picks blocks by
            # their index under the block list's own name, as for a classifier.
            structure = _structure(base.base_model, settings.from_layer)
            layers = {"layers_to_transform": list(range(settings.from_layer,
                                                         len(structure.layers))),
                      "layers_pattern": structure.layers_path.rsplit(".", 1)[-1]}
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, target_modules=targets,
                            lora_dropout=0.0, bias="none",
                            fan_in_fan_out=_stores_weights_transposed(backbone.model, targets),
                            **layers)
        with torch.random.fork_rng():  # peft draws lora_A: the same start in every process
            torch.manual_seed(seed)
            try:
                self.backbone = get_peft_model(base, config)
            except ValueError as exc:
                raise ConfigError(f"tuning.lora.targets={list(settings.targets)}: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.lora_config = config
        self.lr_scale = settings.lr_scale
        if structure is not None:
            # `base` holds the adapters (peft injects them in place). A tuple: the head is
            # already registered inside `self.backbone`, never a second time.
            self._lm_head = (base.get_output_embeddings(),)
            self.prefix = FrozenPrefix(base.base_model, settings.from_layer, backbone.hash,
                                       backbone.name, "tuning.lora.from_layer", structure)
            self._check_head_against_forward()

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        if self.prefix is None:
            return super().forward_from(hidden, attention_mask)
        return self._lm_head[0](self.prefix.suffix(hidden, attention_mask))

    @torch.no_grad()
    def _check_head_against_forward(self) -> None:
        """The prefix checks the decoder's states; this, that the LM head alone turns them
        into the model's logits (a family that scales or caps its logits is refused)."""
        assert self.prefix is not None
        words = self.prefix.model.get_input_embeddings().weight
        start = max(0, min(1000, words.shape[0] - 6))
        ids = torch.arange(start, start + 6, device=words.device).unsqueeze(0)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        keep = mask[0].bool()
        expected = self.forward(ids, mask)[:, keep]
        got = self.forward_from(self.prefix.states(ids, mask), mask)[:, keep]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise ConfigError(f"tuning.lora.from_layer={self.prefix.layer}: this "
                              f"{self.prefix.structure.model_type!r} model's logits are not "
                              "its LM head on its last hidden states; use from_layer = 0")

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.trainable_state().values()), "lr": lr * self.lr_scale}]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).logits


class CausalLMPrompt(TunedModel):
    method = "prompt"

    def __init__(self, backbone: Backbone, cfg: TuningConfig, seed: int) -> None:
        super().__init__()
        settings = cfg.settings("prompt")
        self.backbone = backbone.model  # shared and frozen: only the prompt trains
        words = self.backbone.get_input_embeddings().weight
        # Rows of the vocabulary's own embeddings (Lester et al.: sampled vocabulary), seeded:
        # not DP randomness, the same start in every process.
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, words.shape[0], (settings.length,), generator=generator)
        self.prompt = SoftPrompt(words[rows].detach().clone())
        self.prompt_lr_scale = settings.lr_scale

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.prompt.parameters()), "lr": lr * self.prompt_lr_scale}]

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt before the word embeddings, and the mask covering it (split mode's
        head starts from these too)."""
        batch = input_ids.shape[0]
        prompt = self.prompt(batch)
        words = self.backbone.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt.to(words.dtype), words], dim=1)
        mask = torch.cat([torch.ones(batch, prompt.shape[1], dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        return embeds, mask

    def input_positions(self, logits: torch.Tensor) -> torch.Tensor:
        """The input's own positions: the loss never scores a prompt."""
        return logits[:, self.prompt.embedding.num_embeddings:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds, mask = self.embed_inputs(input_ids, attention_mask)
        logits = self.backbone(inputs_embeds=embeds, attention_mask=mask,
                               use_cache=False).logits
        return self.input_positions(logits)


class CausalLMSlash(TunedModel):
    method = "slash"

    def __init__(self, backbone: Backbone, cfg: TuningConfig) -> None:
        super().__init__()
        settings = cfg.settings("slash")
        self.backbone = backbone.model  # shared and frozen: the shifts live in hooks
        place_shifts(self, backbone, settings)
        self.lr_scale = settings.lr_scale

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.z.parameters()), "lr": lr * self.lr_scale}]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        z = self.z(input_ids.shape[0])
        handles = []
        for i, target in enumerate(self._targets):
            shift = (z @ getattr(self, f"proj_{i}")).unsqueeze(1)
            handles.append(target.register_forward_hook(
                lambda _m, _inp, out, shift=shift: out + shift))
        try:  # the hooks exist only inside this forward: the shared decoder stays as loaded
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()


@register_builder("slash", kind=KIND)
def build_slash(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                ) -> TunedModel:
    return CausalLMSlash(backbone, cfg)


@register_builder("lora", kind=KIND)
def build_lora(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
               ) -> TunedModel:
    return CausalLMLoRA(backbone, cfg, seed)


@register_builder("prompt", kind=KIND)
def build_prompt(backbone: Backbone, cfg: TuningConfig, num_labels: int, seed: int
                 ) -> TunedModel:
    return CausalLMPrompt(backbone, cfg, seed)

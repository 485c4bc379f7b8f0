"""What a run does once with its `prune_layers` setting: resolve a rule into the explicit
indices it drops (at the run's start, from the unpruned model), and the ledger's pruning
record of the backbone the server built."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fedtune.models.layer_pruning import layers_to_drop

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.models.backbone import Backbone


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with a rule in `model.prune_layers` replaced by the explicit indices it drops
    (a copy; `cfg` itself when it already holds a list). Run once at a run's start, so the
    run's config.toml, its workers and anything rebuilt from it use the same layers."""
    value = cfg.model.prune_layers
    if not isinstance(value, str):
        return cfg
    # Here, not at module load: `fedtune run` resolves the config before Ray starts, and the
    # main thread must not import torch then (the driver's other thread does).
    from fedtune.models.backbone import load_pretrained

    # Unpruned, not kept in the cache; loaded as the task kind's workers load it (a causal
    # LM with its head: the importance rule then reads its next-token distributions).
    model, tokenizer = load_pretrained(cfg.model.backbone, cfg.task.kind)
    resolved = copy.deepcopy(cfg)
    resolved.model.prune_layers = layers_to_drop(value, model, tokenizer)
    return resolved


def pruning_record(backbone: Backbone, max_length: int) -> dict[str, Any]:
    """The ledger's pruning fields, computed by the server from its own backbone:
    `layers_kept` (original indices) and `backbone_flops_per_example`, the forward FLOPs
    of the (pruned) backbone on one example of `max_length` tokens (torch's FlopCounterMode,
    as clients count theirs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedtune.models.families import _accepts_use_cache

    model = backbone.model
    extra = {"use_cache": False} if _accepts_use_cache(type(model)) else {}
    ids = torch.full((1, max_length), 1000 % model.get_input_embeddings().num_embeddings,
                     dtype=torch.long, device=model.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    return {"layers_kept": list(backbone.layers_kept),
            "backbone_flops_per_example": float(counter.get_total_flops())}

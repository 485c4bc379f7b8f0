"""A causal-LM row's positions against the backbone's: every row is padded to
`model.max_length` tokens, and a soft prompt (`tuning.method = "prompt"`, which a causal LM
takes at the word embeddings) puts its `tuning.prompt.length` virtual tokens in front. A
model with a learned position table (GPT-2's `n_positions`) has no position past its limit
(torch's "index out of range in self" in the first forward); a rotary one (Llama) was never
trained past it. Checked once the backbone's config is loaded, before any text is
tokenized (`fedtune.task.task`, through the task kind's `check_backbone`).
"""

from __future__ import annotations

from typing import Any

from fedtune.config import ConfigError, ExperimentConfig

# The config keys a model family names its position limit with (the first one set wins).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def position_limit(config: Any) -> tuple[str, int] | None:
    """(config key, limit) of the model's positions; None where its config names none. The
    key is the one in the model's config.json (GPT-2 answers `max_position_embeddings`
    through its `attribute_map` for `n_positions`)."""
    aliases = getattr(config, "attribute_map", None) or {}
    for name in POSITION_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return aliases.get(name, name), value
    return None


def soft_prompt_length(cfg: ExperimentConfig) -> int:
    """The virtual tokens the tuning method puts in front of every row (0: none)."""
    return cfg.tuning.settings("prompt").length if cfg.tuning.method == "prompt" else 0


def check_lm_positions(backbone: Any, cfg: ExperimentConfig) -> None:
    """One line naming model.max_length, the soft prompt and the model's limit where a row
    takes more positions than the backbone (a `fedtune.models.Backbone`) has."""
    limit = position_limit(backbone.model.config)
    if limit is None:
        return
    key, most = limit
    prompt = soft_prompt_length(cfg)
    if cfg.model.max_length + prompt <= most:
        return
    with_prompt = f" + tuning.prompt.length={prompt}" if prompt else ""
    raise ConfigError(
        f"model.max_length={cfg.model.max_length}{with_prompt} positions exceed the "
        f"backbone's {key}={most} ({cfg.model.backbone}); set model.max_length <= "
        f"{most - prompt}" + (" or shorten the soft prompt" if prompt else ""))

"""The built-in tuning methods' `[tuning.<method>]` settings, and their specs.

Config validation reads these (through `fedtune.config.registry`) before a run starts Ray; the
builders live in `fedtune.tuning.<method>`, which import torch. So the dataclasses and the
specs (split support, plugins) are registered here, without torch, and each builder module
attaches its builder to the spec by name (`fedtune.tuning.registry.register_builder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fedtune.config.checks import (
    SEED_MAX,
    require_choice,
    require_nonnegative,
    require_positive,
)
from fedtune.config.errors import ConfigError
from fedtune.config.registry import ALL_PLUGINS, MethodSpec, register_method_spec

_Config = TypeVar("_Config", bound=type)

# Upper bounds that fit one 24 GiB machine, per `[tuning.<method>]` field (checked by
# fedtune.config.checks.check_table_bounds after each table's own rules, one line naming key and
# range). A relative learning rate past 100 is a typo (the built-in ones are 0.02-0.1);
# a block index past 10_000 names no block of any model (as split.cut_layer).
LR_SCALE = (1e-9, 100.0)
BLOCK = (0, 10_000)
Bounds = dict[str, tuple[float, float]]


def _method(name: str, *, split: bool = False, plugins: tuple[str, ...] = ALL_PLUGINS,
            refused_grad_modes: tuple[tuple[str, str], ...] = ()
            ) -> Callable[[_Config], _Config]:
    """Register the decorated dataclass as method `name`'s `[tuning.<name>]` table."""
    def deco(config: _Config) -> _Config:
        register_method_spec(MethodSpec(name, config, split, tuple(plugins),
                                        tuple(refused_grad_modes)))
        return config

    return deco


class FromLayerSettings:
    """For a method's config dataclass with a `from_layer` field (its trainable tensors only
    in blocks >= from_layer): whether that leaves a frozen prefix, and a fingerprint that
    leaves `from_layer` out at its default, so runs made before the field existed keep
    their spec hash."""

    def frozen_prefix(self) -> bool:
        return self.from_layer > 0  # type: ignore[attr-defined]

    def fingerprint(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        if out["from_layer"] == 0:
            del out["from_layer"]
        return out


@_method("bitfit")
@dataclass
class BitFitConfig(FromLayerSettings):
    """`[tuning.bitfit]`."""

    # Learning rate of the biases relative to train.lr (the head's).
    lr_scale: float = 0.02
    # Only biases in blocks >= from_layer (and after the blocks) train; 0 = every bias.
    from_layer: int = 0
    BOUNDS: ClassVar[Bounds] = {"lr_scale": LR_SCALE, "from_layer": BLOCK}

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.lr_scale", self.lr_scale)
        require_nonnegative(f"{prefix}.from_layer", self.from_layer)


@_method("head")
@dataclass
class HeadConfig:
    """`[tuning.head]`: nothing beyond the shared head settings (`tuning.head_hidden`,
    `tuning.domain_head`)."""

    def validate(self, prefix: str) -> None:
        pass

    def frozen_prefix(self) -> bool:
        return True

    def fingerprint(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@_method("lora")
@dataclass
class LoRAConfig(FromLayerSettings):
    """`[tuning.lora]`: rank, scaling numerator and the linear layers that get adapters."""

    r: int = 8
    alpha: int = 16
    # Empty: derived from the backbone's attention projections (query/value-like).
    targets: list[str] = field(default_factory=list)
    # Learning rate of the adapters relative to train.lr (the head's). At the head's SGD
    # rate of 1.0, LoRA diverged on the quickstart (one-class predictions).
    lr_scale: float = 0.02
    # Adapters only in blocks >= from_layer; blocks below it stay frozen (and cacheable).
    from_layer: int = 0
    # Rank 1024 is past any useful rank (the adapted widths); its per-example gradients at
    # rank 1024 already take gigabytes. alpha only scales the update (alpha / r).
    BOUNDS: ClassVar[Bounds] = {
        "r": (1, 1_024), "alpha": (1, 65_536), "lr_scale": LR_SCALE, "from_layer": BLOCK}

    def validate(self, prefix: str) -> None:
        for name in ("r", "alpha", "lr_scale"):
            require_positive(f"{prefix}.{name}", getattr(self, name))
        require_nonnegative(f"{prefix}.from_layer", self.from_layer)
        if any(not isinstance(t, str) or not t for t in self.targets):
            raise ConfigError(f"{prefix}.targets must be module names (or [] to derive)")


# Split mode runs the prompt only: its prompt sits before the cut and its head in the tail
# (fedtune.split.SplitPromptModel is a view of a PromptModel).
@_method("prompt", split=True)
@dataclass
class PromptConfig:
    """`[tuning.prompt]`."""

    # Soft-prompt tokens.
    length: int = 20
    # The prompt's learning rate is train.lr times this. Prompt rows live at the scale of
    # token embeddings (~0.05 per coordinate); at the head's rate, DP noise would push them
    # off that scale within a few steps and wreck the backbone's features.
    lr_scale: float = 0.05
    # The block whose input the prompt is spliced into; 0 = the word embeddings.
    layer: int = 0
    # 4096 prompt tokens are more than any backbone's positions, let alone max_length.
    BOUNDS: ClassVar[Bounds] = {"length": (1, 4_096), "lr_scale": LR_SCALE, "layer": BLOCK}

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.length", self.length)
        require_positive(f"{prefix}.lr_scale", self.lr_scale)
        require_nonnegative(f"{prefix}.layer", self.layer)

    def frozen_prefix(self) -> bool:
        """Whether blocks below the prompt hold nothing trainable (a cacheable prefix)."""
        return self.layer > 0

    def fingerprint(self) -> dict[str, Any]:
        # `layer` is newer than the spec hashes of existing runs: at its default it is left
        # out, so a layer-0 prompt keeps the spec (checkpoints, exports) it always had.
        out = dataclasses.asdict(self)
        if self.layer == 0:
            del out["layer"]
        return out


# Where SLaSh's shift goes in each block (the sub-layer whose output is shifted), found by
# fedtune.models.families: "output" (MLP down), "attention" (attention output projection),
# "intermediate" (MLP up).
SLASH_POSITIONS = ("output", "attention", "intermediate")


# Opacus' expanded weights replace each layer's weight by a per-example copy and need a
# batch dimension in the layer's input; SLaSh projects its one shared vector z (no batch
# dimension), so every DP step would fail ("Expanded Weights needs an input with a batch
# size"), for a classifier and a causal LM alike.
@_method("slash", refused_grad_modes=(
    ("ew", "Opacus' expanded weights need a batch dimension in each layer's input, and "
           "SLaSh projects one shared vector z without one"),))
@dataclass
class SlashConfig:
    """`[tuning.slash]`: size of the shared vector z, seed of the fixed projections, the
    sub-layer whose output is shifted (output | attention | intermediate), and z's lr
    relative to train.lr."""

    size: int = 1024
    seed: int = 0
    position: str = "output"
    lr_scale: float = 0.1
    # Each block holds a fixed size x width fp32 projection: 16k x 3072 is 200 MB a block,
    # ~5 GB for 24 blocks. The seed is numpy-seedable (as the run's seed).
    BOUNDS: ClassVar[Bounds] = {"size": (1, 16_384), "seed": (0, SEED_MAX), "lr_scale": LR_SCALE}

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.size", self.size)
        require_nonnegative(f"{prefix}.seed", self.seed)
        require_choice(f"{prefix}.position", self.position, SLASH_POSITIONS)
        require_positive(f"{prefix}.lr_scale", self.lr_scale)

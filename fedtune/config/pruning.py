"""The grammar of `[model] prune_layers`, checked without a model: a list of distinct block
indices >= 0, or a rule string `"<rule>:<k>"` with k >= 1 naming a rule registered in
`fedtune.models.layer_pruning` (looked up by name through `fedtune.config.registry`, so the
config never imports the code that prunes)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedtune.config.errors import ConfigError
from fedtune.config.registry import available

FIELD = "model.prune_layers"
# What `load_backbone` takes (hashable, for its per-process cache): sorted indices to drop,
# or a rule string.
PruneKey = tuple[int, ...] | str
RULE_KIND = "layer pruning rule"
_RULE_SYNTAX = re.compile(r"^([a-z_]+):(-?\d+)$")


def split_rule(text: str) -> tuple[str, int]:
    """`"every:3"` -> ("every", 3); a ConfigError naming `model.prune_layers` otherwise."""
    rules = available(RULE_KIND)
    match = _RULE_SYNTAX.match(text.strip())
    if match is None:
        raise ConfigError(f"{FIELD}={text!r} is neither a list of layer indices nor a rule "
                          f"'<rule>:<k>' with rule one of: {', '.join(rules)}")
    name, k = match.group(1), int(match.group(2))
    if name not in rules:
        raise ConfigError(f"{FIELD}={text!r}: unknown rule {name!r}; rules: {', '.join(rules)}")
    if k < 1:
        raise ConfigError(f"{FIELD}={text!r}: k must be >= 1, got {k}")
    return name, k


def check_setting(value: Sequence[int] | str) -> None:
    """What can be checked without the model: a known rule with k >= 1, or indices that
    are >= 0 and distinct. The layer count is checked when the backbone is loaded."""
    if isinstance(value, str):
        split_rule(value)
        return
    negative = [i for i in value if i < 0]
    if negative:
        raise ConfigError(f"{FIELD}={list(value)}: layer indices must be >= 0, got {negative}")
    duplicates = sorted({i for i in value if list(value).count(i) > 1})
    if duplicates:
        raise ConfigError(f"{FIELD}={list(value)}: layer {duplicates} listed more than once")


def prune_key(value: Sequence[int] | str) -> PruneKey:
    """The cache key `load_backbone` takes for a `prune_layers` setting."""
    return value if isinstance(value, str) else tuple(sorted(value))


def show(value: PruneKey) -> str:
    return repr(value) if isinstance(value, str) else str(list(value))

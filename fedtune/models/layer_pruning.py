"""Structured layer pruning (`[model] prune_layers`): whole transformer blocks of the frozen
backbone are dropped when it is loaded, identically in every process (clients, server,
`export`, `predict`), so every client step and evaluation runs fewer layers.

`prune_layers` is either an explicit list of the block indices to drop (`[4, 5]`; `[]`
drops nothing) or a rule string `"<rule>:<k>"` from the registry below (`"every:3"`,
`"top:2"`, `"importance:2"`). A run resolves a rule once, at its start, into the explicit
list (`resolve_config`); that list is what its `config.toml` holds, so a resume, an export
or a predict rebuilds exactly the layers the run trained on. The kept layers (original
indices) enter the backbone hash, so a delta made on one pruning is rejected on another.

Nothing here imports torch or transformers at module load: the config validates rule
strings through `check_setting` without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.config.errors import ConfigError
from fedtune.config.pruning import FIELD, PruneKey, show, split_rule

if TYPE_CHECKING:
    from torch import nn

@dataclass(frozen=True)
class RuleContext:
    """What a rule may read: the layer count, and (for data-driven rules) the unpruned
    model and its tokenizer."""

    num_layers: int
    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    # (k, context) -> the indices to drop
    drop: Callable[[int, RuleContext], list[int]]


_RULES: dict[str, Rule] = {}


def register_rule(name: str, doc: str) -> Callable[[Callable[[int, RuleContext], list[int]]],
                                                   Callable[[int, RuleContext], list[int]]]:
    """Register `fn(k, context) -> indices to drop` as the rule `"<name>:<k>"`."""
    def wrap(fn: Callable[[int, RuleContext], list[int]]
             ) -> Callable[[int, RuleContext], list[int]]:
        if name in _RULES:
            raise ValueError(f"layer pruning rule {name!r} is registered twice")
        _RULES[name] = Rule(name, doc, fn)
        return fn
    return wrap


def available_rules() -> list[str]:
    return sorted(_RULES)


@register_rule("every", "every k-th layer counted from the top: L-1, L-1-k, L-1-2k, ...")
def _every(k: int, ctx: RuleContext) -> list[int]:
    return list(range(ctx.num_layers - 1, -1, -k))


@register_rule("top", "the k top layers: L-k .. L-1")
def _top(k: int, ctx: RuleContext) -> list[int]:
    return list(range(max(ctx.num_layers - k, 0), ctx.num_layers))


@register_rule("importance", "the k layers whose skipping changes the model's output least "
                             "(an encoder's pooled representation, a decoder's next-token "
                             "distributions), on a fixed public input")
def _importance(k: int, ctx: RuleContext) -> list[int]:
    scores = layer_importance(ctx.model, ctx.tokenizer)
    # Ties (identical scores) go to the lower index, so every process ranks alike.
    ranked = sorted(range(ctx.num_layers), key=lambda i: (scores[i], i))
    return sorted(ranked[:k])


def parse_rule(text: str) -> tuple[Rule, int]:
    """`"every:3"` -> (the rule, 3); a ConfigError naming `model.prune_layers` otherwise."""
    name, k = split_rule(text)
    return _RULES[name], k


def layers_to_drop(value: PruneKey, model: nn.Module, tokenizer: Any) -> list[int]:
    """The indices `value` drops from `model` (unpruned), checked against its layer count:
    out of range, or every layer, is a ConfigError."""
    from fedtune.models.families import FamilyError, derive_structure

    try:
        num_layers = len(derive_structure(model).layers)
    except FamilyError as exc:
        raise ConfigError(f"{FIELD}={show(value)} cannot prune this model: {exc}") from None
    if isinstance(value, str):
        rule, k = parse_rule(value)
        drop = sorted(set(rule.drop(k, RuleContext(num_layers, model, tokenizer))))
    else:
        drop = sorted(value)
        outside = [i for i in drop if i >= num_layers]
        if outside:
            raise ConfigError(f"{FIELD}={show(value)}: index {outside} out of range for this "
                              f"backbone's {num_layers} layers (allowed 0..{num_layers - 1})")
    if len(drop) >= num_layers:
        raise ConfigError(f"{FIELD}={show(value)} drops all {num_layers} layers of this "
                          "backbone; at least one must stay")
    return drop


# Config fields holding one entry per block (decoders: full vs sliding-window attention).
_PER_LAYER_CONFIG = ("layer_types",)


def prune_model(model: nn.Module, drop: Sequence[int]) -> tuple[int, ...]:
    """Drop the blocks `drop` of `model` in place (its config too); returns the original
    indices of the blocks kept."""
    from torch import nn

    from fedtune.models.families import derive_structure

    structure = derive_structure(model)
    num_layers = len(structure.layers)
    kept = tuple(i for i in range(num_layers) if i not in set(drop))
    blocks = nn.ModuleList([structure.layers[i] for i in kept])
    parent, _, attr = structure.layers_path.rpartition(".")
    setattr(model.get_submodule(parent), attr, blocks)
    config = model.config
    # Every family maps its own name for the depth (n_layer, n_layers) onto this one; the
    # forward and the cache size by it.
    config.num_hidden_layers = len(kept)
    # Read by error messages that count layers (a split cut), and saved with the config.
    config.fedtune_layers_kept = list(kept)
    # Per-layer lists in the config follow their blocks.
    for key in _PER_LAYER_CONFIG:
        item = getattr(config, key, None)
        if isinstance(item, (list, tuple)) and len(item) == num_layers:
            setattr(config, key, [item[i] for i in kept])
    # A decoder's attention indexes the KV cache by its `layer_idx`; renumbered so a cache
    # (off in fedtune: use_cache=False) would still get one slot per remaining block.
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    return kept


# The fixed public input of the importance rule. Why this data: the rule selects (which
# layers stay), so it must not read the test split; and every process (clients in a
# deployment hold no server data) must reach the same answer. Text written here is public
# and the same everywhere; the backbone's own tokenizer turns it into ids. It mixes plain
# prose with the kinds of lines an e-mail holds, so the layers that matter for text like the
# corpora's are the ones kept.
PUBLIC_TEXTS = (
    "The meeting has been moved to Thursday afternoon; please bring the quarterly report.",
    "Congratulations! You have been selected to receive a free gift card. Click here now.",
    "I tried the patch on my machine and the build still fails with the same linker error.",
    "Subject: Re: weekend plans. Are we still going hiking if the weather stays like this?",
    "Limited time offer: lose weight fast with our natural formula, no prescription needed.",
    "The library will be closed on Monday for maintenance of the heating system.",
    "Thanks for the quick reply. I have attached the corrected version of the document.",
    "A small river runs through the valley, and the old mill still stands on its bank.",
)
PUBLIC_MAX_TOKENS = 32


@dataclass(frozen=True)
class Readout:
    """What the importance rule compares for a model that returns `field`: `reduce` turns
    one text's output into what the model is read for; `distance` scores a block's
    skipping from those of every text, with and without the block (>= 0; 0 when nothing
    changes)."""

    field: str
    reduce: Callable[[Any], Any]
    distance: Callable[[list[Any], list[Any]], float]


def _cosine_distance(full: list[Any], skipped: list[Any]) -> float:
    """Mean over the texts of 1 - cos between the pooled vectors."""
    import torch

    cos = torch.nn.functional.cosine_similarity(torch.stack(full), torch.stack(skipped),
                                                dim=-1)
    return float((1.0 - cos).mean())


def _next_token_kl(full: list[Any], skipped: list[Any]) -> float:
    """Mean over the texts of KL(full || skipped) of the next-token distributions,
    averaged over each text's positions (inputs are log-probabilities)."""
    kls = [float((f.exp() * (f - s)).sum(dim=-1).mean())
           for f, s in zip(full, skipped, strict=True)]
    return sum(kls) / len(kls)


# By the output field a model returns, first match wins: a decoder loaded with its LM head
# (a causal-LM task) is read for its next-token distributions, what its loss and its
# generations depend on; an encoder for its pooled (masked-mean) last hidden states, what
# a classification head reads. One text per forward: the mask is all ones, so the plain
# mean is the masked mean.
READOUTS = (
    Readout("logits", lambda logits: logits[0].float().log_softmax(dim=-1), _next_token_kl),
    Readout("last_hidden_state", lambda hidden: hidden.mean(dim=1).squeeze(0),
            _cosine_distance),
)


def layer_importance(model: nn.Module, tokenizer: Any) -> list[float]:
    """Per block: the mean distance (`READOUTS`, by what the model returns) between the
    model's output with and without that block, over `PUBLIC_TEXTS`. Skipping a block is
    modelled as the identity (its input passes through), which is what pruning does."""
    import torch

    from fedtune.models.families import _accepts_use_cache, derive_structure

    structure = derive_structure(model)
    extra = {"use_cache": False} if _accepts_use_cache(type(model)) else {}
    # One text per forward: no padding, so a tokenizer without a pad token works too.
    inputs = [tokenizer(text, truncation=True, max_length=PUBLIC_MAX_TOKENS,
                        return_tensors="pt") for text in PUBLIC_TEXTS]

    def outputs() -> list[Any]:
        return [model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      **extra) for enc in inputs]

    def identity(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else next(kwargs[k] for k in ("hidden_states", "hidden_state",
                                                               "x") if k in kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    was_training = model.training
    model.eval()
    scores = []
    with torch.inference_mode():
        first = outputs()
        readout = next((r for r in READOUTS if getattr(first[0], r.field, None) is not None),
                       None)
        if readout is None:
            raise ConfigError(f"{FIELD}: the importance rule reads a model's "
                              f"{' or '.join(r.field for r in READOUTS)}; this "
                              f"{type(model).__name__} returns neither")
        full = [readout.reduce(getattr(out, readout.field)) for out in first]
        for block in structure.layers:
            handle = block.register_forward_hook(identity, with_kwargs=True)
            try:
                skipped = [readout.reduce(getattr(out, readout.field)) for out in outputs()]
            finally:
                handle.remove()
            scores.append(readout.distance(full, skipped))
    model.train(was_training)
    return scores

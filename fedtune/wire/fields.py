"""The one table of what crosses the wire: every field each message carries under a run's
settings, what it reveals and whether it is clipped and noised. The privacy statements
(`privacy_in_clear` in every round line, `split_privacy`, the table in docs/wire.md) are generated
from it, and tests/test_wire_statement.py records every key a reply carries and every
tensor the split body receives in real runs and compares them with it.

A field's `about` says whose secret it can carry:

- "example": something of individual examples or of the secret Poisson draw (text,
  labels, lengths, how many rows a round really trained on, a loss). In clear it is
  outside every epsilon; under DP it stays on the client unless `privacy.disclose_counts`.
- "size": the client's data size n, which the server knows anyway (it plans each
  client's DP charge from the partition size, or the count a node gave at discovery).
- "public": nothing beyond the run's config.

A field with `only_when` is sent by some nodes only, for a reason the server's config cannot
show (a node that trains on its own data file): the statement lists it with that condition,
and a recorder finds it only where the condition holds (`conditional_keys`).

Keys are `record.key` for reply records (fedtune.wire.protocol) and `body.<call>.<tensor>` for
what the split body receives (`probe`: the FLOP measurement, synthetic text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtune.config import ExperimentConfig, load_config
from fedtune.wire.protocol import (
    DP_KEYS,
    EXAMPLES_SEEN,
    EXTRA_GROUPS,
    FLOPS,
    LOSS,
    NUM_EXAMPLES,
    STEPS,
)

IN_CLEAR = "in clear"
DP_SGD = "clipped and noised per example (DP-SGD): covered by epsilon_sample"
SMASHED_DP = ("clipped and noised per example on the client (split.smashed_dp), in fixed "
              "slots: covered by epsilon_sample")
ALL_ONES = "all ones (split.smashed_dp): carries no length"
SYNTHETIC = "synthetic: fixed token ids and an all-ones mask, no client data"
USER_CLIENT = ("clipped on the client to privacy.user.clip_norm; the server adds the noise "
               "to the aggregate (user-level DP, central: the server sees it clipped)")
USER_SERVER = ("in clear to the server, which clips and noises the aggregate (user-level "
               "DP, central: epsilon_user covers the release, not the server's view)")

TRAIN, DISCOVERY, BODY = "train reply", "discovery reply", "split body"


@dataclass(frozen=True)
class WireField:
    """One field of one message, as the run sends it."""

    message: str
    item: str  # the name the statement shows
    keys: tuple[str, ...]  # as they cross the wire
    reveals: str
    protection: str
    about: str  # "example", "size" or "public" (module docstring)
    only_when: str = ""  # sent only by nodes where this holds; "" = always (docstring)

    @property
    def in_clear(self) -> bool:
        return self.protection not in (DP_SGD, SMASHED_DP, ALL_ONES, SYNTHETIC, USER_CLIENT)

    @property
    def shown(self) -> str:
        """What it reveals, with the condition it is sent under."""
        return (f"{self.reveals} (sent only {self.only_when})" if self.only_when
                else self.reveals)

    def row(self) -> dict[str, Any]:
        return {"message": self.message, "keys": list(self.keys), "reveals": self.reveals,
                "protection": self.protection, "about": self.about,
                "only_when": self.only_when}


def withholds_counts(cfg: ExperimentConfig) -> bool:
    """Replies leave out the example count, real-row counts, FLOPs, the loss and the plugin
    figures: under user-level DP when `withhold_metrics` asks it, and under sample-level
    DP (smashed DP included) unless `privacy.disclose_counts` opts in."""
    user, sample = cfg.privacy.user, cfg.privacy.sample
    return (user.enabled and user.withhold_metrics) or (
        sample.enabled and not cfg.privacy.disclose_counts)


# -- the table: one rule per field, (cfg) -> the field as sent, or None when not sent ------

def _metrics(*keys: str) -> tuple[str, ...]:
    return tuple(f"metrics.{k}" for k in keys)


def _plugins(cfg: ExperimentConfig) -> set[str]:
    return {str(table.get("name")) for table in cfg.plugins}


def _delta(cfg: ExperimentConfig) -> WireField:
    user, sample = cfg.privacy.user, cfg.privacy.sample
    reveals = "the client's update (delta = local - global) and its norm"
    if sample.enabled:
        protection = DP_SGD
    elif user.enabled:
        protection = USER_CLIENT if user.clipping == "client" else USER_SERVER
    else:
        protection = IN_CLEAR
    if user.enabled and user.clipping == "client":
        reveals += ", clipped on the client: its norm up to that bound"
    return WireField(TRAIN, "delta", ("delta.vector",), reveals, protection, "example")


def _steps(cfg: ExperimentConfig) -> WireField:
    by_size = cfg.train.local_epochs > 0
    return WireField(TRAIN, "steps", _metrics(STEPS.key),
                     "local steps taken" + (" (train.local_epochs > 0: they reveal the data "
                                            "size)" if by_size else ", fixed by the config"),
                     IN_CLEAR, "size" if by_size else "public")


def _counted(item: str, keys: tuple[str, ...], reveals: str,
             when: Callable[[ExperimentConfig], bool] = lambda cfg: True
             ) -> Callable[[ExperimentConfig], WireField | None]:
    """A field of what `withholds_counts` keeps home."""
    def rule(cfg: ExperimentConfig) -> WireField | None:
        if not when(cfg):
            return None
        return WireField(TRAIN, item, keys, reveals, IN_CLEAR, "example")
    rule.withholdable = True  # type: ignore[attr-defined]
    rule.applies = when  # type: ignore[attr-defined]
    rule.item = item  # type: ignore[attr-defined]
    return rule


def _group(name: str) -> tuple[str, ...]:
    return _metrics(*(s.key for s in EXTRA_GROUPS[name]))


def _reported_dp(cfg: ExperimentConfig) -> WireField | None:
    if not cfg.privacy.sample.enabled:
        return None
    return WireField(TRAIN, "reported DP spend", _metrics(*DP_KEYS),
                     "noise_multiplier, sample_rate, steps, epsilon and the DP history the "
                     "client reports; sample_rate = 1/ceil(n/B) reveals the data size n to "
                     "within a batch (the server plans each charge from that same n)",
                     IN_CLEAR, "size")


@dataclass(frozen=True)
class SplitRows:
    """What one example's split traffic is, in the words of a task kind (`{who}`: whose
    rows, e.g. "every trained example")."""

    activations: str
    masks: str
    gradients: str
    # What smashed DP clips and noises as one row.
    unit: str


# Task kind -> its split rows' words (the kinds of `fedtune.config.task`).
SPLIT_ROWS: dict[str, SplitRows] = {
    "classification": SplitRows(
        activations="cut-layer activations of {who} (at cut 0 the token embeddings: tokens "
                    "are recoverable, see `fedtune audit split`)",
        masks="attention masks of {who} (each example's length)",
        gradients="per-example gradients at the body output of {who} (they reveal each "
                  "example's label against the tail the server sent)",
        unit="example"),
    # A causal LM's rows are texts, and a text is also its own labels.
    "causal_lm": SplitRows(
        activations="per-token cut-layer activations of {who}, every position of every "
                    "text (at cut 0 the token embeddings themselves: the texts are "
                    "recoverable)",
        masks="attention masks of {who} (each text's length in tokens)",
        gradients="per-token gradients at the body output of {who} (the texts are their "
                  "own labels, and the tail - split.tail_layers, final norm, LM head - is "
                  "frozen pretrained weights the server holds: they reveal each next token)",
        unit="text (the rows of all its positions, clipped together)"),
}


def split_rows(cfg: ExperimentConfig) -> SplitRows:
    if cfg.task.kind not in SPLIT_ROWS:
        raise ValueError(f"split mode states no traffic for task.kind={cfg.task.kind!r}; "
                         f"known: {', '.join(SPLIT_ROWS)}")
    return SPLIT_ROWS[cfg.task.kind]


def _body(call: str, item: str, reveals_clear: str, gradients: bool = True
          ) -> Callable[[ExperimentConfig], list[WireField]]:
    def rule(cfg: ExperimentConfig) -> list[WireField]:
        if not cfg.split.enabled:
            return []
        smashed = cfg.split.smashed_dp.enabled and cfg.privacy.sample.enabled
        rows = split_rows(cfg)
        fields = [
            WireField(BODY, f"{item}: cut-layer activations", (f"body.{call}.activations",),
                      rows.activations.format(who=reveals_clear),
                      SMASHED_DP if smashed else IN_CLEAR, "example"),
            WireField(BODY, f"{item}: attention masks", (f"body.{call}.attention_mask",),
                      rows.masks.format(who=reveals_clear),
                      ALL_ONES if smashed else IN_CLEAR, "example")]
        if gradients:  # sent by the backward call that follows each forward
            fields.append(WireField(
                BODY, f"{item}: body-output gradients", ("body.backward.gradients",),
                rows.gradients.format(who=reveals_clear),
                SMASHED_DP if smashed else IN_CLEAR, "example"))
        return fields
    return rule


def _scoring(cfg: ExperimentConfig) -> list[WireField]:
    if "el2n_pruning" not in _plugins(cfg):
        return []
    return _body("evaluate", "pruning scoring", "every example of the partition (EL2N "
                 "scoring, forward only)", gradients=False)(cfg)


def _probe(cfg: ExperimentConfig) -> list[WireField]:
    if not cfg.split.enabled:
        return []
    return [WireField(BODY, "FLOP probe", ("body.probe.activations",
                                           "body.probe.attention_mask",
                                           "body.probe.gradients"),
                      "nothing of the data: one synthetic row of model.max_length fixed "
                      "token ids, once per worker process (counted as smashed traffic)",
                      SYNTHETIC, "public")]


def _partition(cfg: ExperimentConfig) -> WireField:
    return WireField(DISCOVERY, "partition", ("roster.partition-id",),
                     "the partition this node was started with (node config)", IN_CLEAR,
                     "public")


OWN_FILE = "when the node trains on its own data file (node config data-path)"


def _own_examples(cfg: ExperimentConfig) -> WireField:
    # The client sends it whatever the config says: the server weights the node and plans
    # its DP charges by it, and cannot tell from its config which nodes have their own file.
    # The exact count is of individual examples (it differs between neighbouring datasets),
    # so under DP it is outside epsilon_sample, like `num_examples` with disclose_counts.
    return WireField(DISCOVERY, "own-data example count", ("roster.own-examples",),
                     "the node's exact number of training examples in its own data file",
                     IN_CLEAR, "example", only_when=OWN_FILE)


def _spec_hash(cfg: ExperimentConfig) -> WireField:
    return WireField(TRAIN, "spec hash", ("info.spec-hash",),
                     "the backbone, method and config the client runs", IN_CLEAR, "public")


Rule = Callable[[ExperimentConfig], Any]
# In statement order. `_counted` rules are what withholding keeps on the client.
RULES: tuple[Rule, ...] = (
    _partition,
    _own_examples,
    _delta,
    _spec_hash,
    _steps,
    _reported_dp,
    _counted("num_examples", _metrics(NUM_EXAMPLES.key),
             "the client's number of training examples"),
    _counted("loss", _metrics(LOSS.key), "the client's mean training loss this round"),
    _counted("examples_seen, flops", _metrics(EXAMPLES_SEEN.key, FLOPS.key),
             "examples trained this round (the secret Poisson draw's size) and the compute "
             "spent on them"),
    _counted("split figures", _group("split"),
             "smashed bytes, server FLOPs, split and local-loss steps, and split_examples / "
             "local_loss_examples: the real rows the fixed slots hide",
             lambda cfg: cfg.split.enabled),
    _counted("pruning figures", _group("pruning"),
             "examples available and kept, rescoring, FLOPs saved (reveal the data size)",
             lambda cfg: "el2n_pruning" in _plugins(cfg)),
    _counted("pruning split figures", _group("pruning_split"),
             "the smashed bytes and server FLOPs pruning saved",
             lambda cfg: "el2n_pruning" in _plugins(cfg) and cfg.split.enabled),
    _counted("importance_weight", _group("importance"),
             "mean importance weight of a source client's examples",
             lambda cfg: "population_expansion" in _plugins(cfg)),
    _body("forward", "split training", "every trained example"),
    _scoring,
    _probe,
)


def _apply(rule: Rule, cfg: ExperimentConfig) -> list[WireField]:
    out = rule(cfg)
    if out is None:
        return []
    return out if isinstance(out, list) else [out]


def wire_fields(cfg: ExperimentConfig) -> list[WireField]:
    """Every field the run's messages carry."""
    withheld = withholds_counts(cfg)
    return [f for rule in RULES if not (withheld and getattr(rule, "withholdable", False))
            for f in _apply(rule, cfg)]


def withheld_fields(cfg: ExperimentConfig) -> list[str]:
    """The items the run keeps on the client (empty when nothing is withheld)."""
    if not withholds_counts(cfg):
        return []
    return [rule.item for rule in RULES  # type: ignore[attr-defined]
            if getattr(rule, "withholdable", False) and rule.applies(cfg)]  # type: ignore


def expected_keys(cfg: ExperimentConfig) -> dict[str, set[str]]:
    """{message: every key it carries under `cfg`}: what a recorder must find, but for
    `conditional_keys` (sent only by some nodes)."""
    out: dict[str, set[str]] = {}
    for f in wire_fields(cfg):
        out.setdefault(f.message, set()).update(f.keys)
    return out


def conditional_keys(cfg: ExperimentConfig) -> dict[str, set[str]]:
    """{message: the keys of `expected_keys` only some nodes send} (`only_when`)."""
    out: dict[str, set[str]] = {}
    for f in wire_fields(cfg):
        if f.only_when:
            out.setdefault(f.message, set()).update(f.keys)
    return out


def examples_in_clear(cfg: ExperimentConfig) -> list[WireField]:
    """Sent fields that carry something of individual examples (or the Poisson draw) with
    no clipping and noise: what no epsilon_sample covers."""
    return [f for f in wire_fields(cfg) if f.about == "example" and f.in_clear]


def statement(cfg: ExperimentConfig) -> dict[str, Any]:
    """`privacy_in_clear` of the ledger: {"sent": {item: what it reveals [protection]},
    "withheld": [items kept on the client], "disclose_counts": the opt-in}."""
    return {"sent": {f.item: f"{f.shown} [{f.protection}]" for f in wire_fields(cfg)},
            "withheld": withheld_fields(cfg),
            "disclose_counts": cfg.privacy.disclose_counts}


def markdown(cfg: ExperimentConfig) -> str:
    """The statement as a Markdown table (`fedtune report`)."""
    lines = ["| message | field | reveals | protection |", "|---|---|---|---|"]
    lines += [f"| {f.message} | {f.item} | {f.shown} | {f.protection} |"
              for f in wire_fields(cfg)]
    withheld = withheld_fields(cfg)
    if withheld:
        lines.append(f"| train reply | withheld (stay on the client) | "
                     f"{', '.join(withheld)} | not sent |")
    return "\n".join(lines)


# The modes the documented statement (docs/wire.md) shows, as `--set` overrides of the defaults.
README_MODES: dict[str, tuple[str, ...]] = {
    "plain (no DP)": ("privacy.sample.enabled=false",),
    "sample-level DP (default)": (),
    "sample-level DP, `privacy.disclose_counts = true`": ("privacy.disclose_counts=true",),
    "split, no DP": ("split.enabled=true", "privacy.sample.enabled=false"),
    "split + DP-SGD, smashed data in clear": ("split.enabled=true",),
    "split + `split.smashed_dp`": ("split.enabled=true", "split.smashed_dp.enabled=true"),
    "user-level DP": ("privacy.sample.enabled=false", "privacy.user.enabled=true"),
    "user-level DP, `withhold_metrics`": ("privacy.sample.enabled=false",
                                          "privacy.user.enabled=true",
                                          "privacy.user.withhold_metrics=true"),
}
README_START, README_END = "<!-- wire-fields:start -->", "<!-- wire-fields:end -->"


def readme_table() -> str:
    """The statement in docs/wire.md, one line per mode (generated: `python -m
    fedtune.wire.fields`; tests/test_wire_statement.py checks the page holds it)."""
    def names(fields: list[WireField]) -> str:
        return ", ".join(f"`{f.item}`" + (" (own-file nodes)" if f.only_when else "")
                         for f in fields) or "-"

    lines = [README_START,
             "| mode | sent in clear: about examples | in clear: data size / public | "
             "clipped and noised (or synthetic) | withheld (stay on the client) |",
             "|---|---|---|---|---|"]
    for mode, sets in README_MODES.items():
        cfg = load_config(None, list(sets))
        sent = wire_fields(cfg)
        lines.append(
            f"| {mode} | {names([f for f in sent if f.in_clear and f.about == 'example'])} | "
            f"{names([f for f in sent if f.in_clear and f.about != 'example'])} | "
            f"{names([f for f in sent if not f.in_clear])} | "
            f"{', '.join(f'`{w}`' for w in withheld_fields(cfg)) or '-'} |")
    return "\n".join([*lines, README_END])


if __name__ == "__main__":
    print(readme_table())

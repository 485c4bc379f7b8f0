"""Every epsilon is shown with what weakens it: ONE renderer (`render_epsilon`) for the
console's round and final lines, the sweep table, `report.md` and its plots, and the
one-line reasons that hold an epsilon (`reason_epsilon`: budget stops, refused claims and
configs), and ONE note (`epsilon_note`) beside each epsilon in rounds.jsonl, summary.json,
the curator's log and exports; the note beside epsilon_user also names its unit
(`fedtune.config.user_unit`). Code that shows an epsilon without holding the whole config
(the privacy ledger, the claim admission) is given the run's marks (`run_marks`).

Marks, each decided from the run's config alone (a registry: add one here and every
output shows it):

- "seeded noise": `privacy.reproducible_noise`; the noise and sampling follow the config's
  seed, so the epsilon holds against nobody who has the config.
- "data in clear": a split run without `split.smashed_dp`; the server saw every trained
  example's smashed data, and epsilon_sample covers the deltas only (shown also when
  DP-SGD is off, so a split run in clear is never unlabelled).
- "counts disclosed": `privacy.disclose_counts` sent example counts, real-row counts,
  FLOPs and losses in clear under DP, outside this epsilon (fedtune.wire.fields).
- "validation rows": `aggregation.norm_bound_direction = "validation"`; which clients'
  deltas each round keeps, zeroes or weights follows the gradient on the server's
  validation rows, so the released model depends on rows no epsilon covers (ATTACK29F).
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import ConfigError, ExperimentConfig, load_config
from fedtune.config.user_unit import user_unit
from fedtune.privacy.randomness import SEEDED_NOISE_NOTE, noise_note
from fedtune.run.folder import CONFIG_FILE
from fedtune.split.disclosure import protects_smashed_data
from fedtune.wire.fields import TRAIN, examples_in_clear

LEVELS = ("sample", "user")


@dataclass(frozen=True)
class Mark:
    tag: str  # what the console and tables show, in brackets
    text: str  # the full note (JSON, report legend)
    # (cfg, level) -> whether the epsilon of that level carries the mark
    applies: Callable[[ExperimentConfig, str], bool]
    shown_when_off: bool = False  # also beside a null epsilon ("off [data in clear]")


def _split_in_clear(cfg: ExperimentConfig, level: str) -> bool:
    return level == "sample" and cfg.split.enabled and not protects_smashed_data(cfg)


def _counts_disclosed(cfg: ExperimentConfig, level: str) -> bool:
    return (level == "sample" and cfg.privacy.sample.enabled
            and any(f.message == TRAIN for f in examples_in_clear(cfg)))


def _validation_steered(cfg: ExperimentConfig, level: str) -> bool:
    return level == "sample" and cfg.aggregation.norm_bound_direction == "validation"


MARKS: tuple[Mark, ...] = (
    Mark("seeded noise", SEEDED_NOISE_NOTE,
         lambda cfg, level: cfg.privacy.reproducible_noise),
    Mark("data in clear",
         "data in clear: a split run without split.smashed_dp; the server saw every trained "
         "example's cut-layer activations, masks and body-output gradients, so this epsilon "
         "covers the deltas only", _split_in_clear, shown_when_off=True),
    Mark("counts disclosed",
         "counts disclosed: privacy.disclose_counts = true sent example counts, real-row "
         "counts, FLOPs and losses to the server in clear, outside this epsilon",
         _counts_disclosed),
    Mark("validation rows",
         "validation rows: aggregation.norm_bound_direction = validation keeps, drops, "
         "zeroes or weights (aggregation.direction_weighting) each client's delta by its "
         "direction against the gradient on the server's first "
         "aggregation.direction_reference_rows validation rows, so the released model "
         "depends on those rows, which this epsilon does not cover", _validation_steered),
)


def epsilon_marks(cfg: ExperimentConfig, level: str, value: float | None = 0.0
                  ) -> list[Mark]:
    """The marks the epsilon of `level` ("sample" or "user") carries; for a null epsilon
    only those shown when off."""
    if level not in LEVELS:
        raise ValueError(f"epsilon level must be one of {LEVELS}, got {level!r}")
    return [m for m in MARKS if m.applies(cfg, level)
            and (value is not None or m.shown_when_off)]


def folder_marks(folder: str | Path, level: str, value: float | None = 0.0) -> list[Mark]:
    """`epsilon_marks` of a run folder's config.toml (none if it has none). ConfigError
    naming the file when it cannot be read: its epsilon is not shown unmarked."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc} (its epsilon's marks come from it)") from None
    return epsilon_marks(cfg, level, value)


def render_epsilon(value: float | None, marks: Sequence[Mark], digits: int = 2,
                   off: str = "off") -> str:
    """An epsilon as every output shows it: `7.99`, `7.99 [seeded noise]`, `off`,
    `off [data in clear]`."""
    text = off if value is None else rounded_up(value, digits)
    tags = [m.tag for m in marks if value is not None or m.shown_when_off]
    return f"{text} [{'; '.join(tags)}]" if tags else text


def rounded_up(value: float, digits: int) -> str:
    """`value` with `digits` decimals, rounded up in decimal (no float product that could
    lose a digit): a shown epsilon never reads back below the accountant's (7.994 shows as
    8.00, not 7.99; reviews ATTACK31, ATTACK32). inf and nan show as themselves."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    with decimal.localcontext() as ctx:
        ctx.prec = 400  # any float's decimal, up to 1e308, fits
        # The float's shortest decimal (repr), which reads back as the same float: 6.03 is
        # shown as 6.03, not as 6.04 from its binary 6.0300000000000002.
        shown = decimal.Decimal(repr(value)).quantize(decimal.Decimal(1).scaleb(-digits),
                                                       rounding=decimal.ROUND_CEILING)
    return f"{shown:f}"


def epsilon_note(cfg: ExperimentConfig, level: str, value: float | None) -> str | None:
    """The note beside an epsilon in JSON: what its noise is secret from, for epsilon_user
    whom it protects (`fedtune.config.user_unit`: a user or a client's shard), and every
    mark's text; null when the epsilon is null (off)."""
    if value is None:
        return None
    texts = [noise_note(cfg.privacy.reproducible_noise)]
    if level == "user":
        texts.append(user_unit(cfg))
    texts += [m.text for m in epsilon_marks(cfg, level, value) if m.text not in texts]
    if level == "sample":
        texts += conditional_disclosures(cfg)
    return "; ".join(texts)


def conditional_disclosures(cfg: ExperimentConfig) -> list[str]:
    """What some nodes send in clear about their examples, for a reason the config cannot
    show (a deployment node that trains on its own data file sends its exact count at
    discovery): the note says it, with its condition; no bracket tag, since the config
    cannot tell whether any node does (review ATTACK31)."""
    return [f"{f.item} sent in clear {f.only_when}, outside this epsilon"
            for f in examples_in_clear(cfg) if f.only_when]


def run_marks(cfg: ExperimentConfig) -> dict[str, tuple[Mark, ...]]:
    """Each level's marks for a non-null epsilon of `cfg`'s run (level -> marks), for code
    built without the whole config (`strategies.privacy_ledger`)."""
    return {level: tuple(epsilon_marks(cfg, level)) for level in LEVELS}


def reason_epsilon(value: float, marks: Sequence[Mark]) -> str:
    """An epsilon inside a one-line reason (a budget stop, a refused claim or config):
    four decimals and its marks' tags, `8.1234 [seeded noise]` (`render_epsilon`)."""
    return render_epsilon(value, marks, digits=4)


def note_fields(cfg: ExperimentConfig, record: dict) -> dict[str, str | None]:
    """`epsilon_sample_note` and `epsilon_user_note` for a record holding both epsilons."""
    return {f"epsilon_{level}_note": epsilon_note(cfg, level, record.get(f"epsilon_{level}"))
            for level in LEVELS}

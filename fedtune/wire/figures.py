"""The optional figure groups of a client's report (`fedtune.wire.protocol.EXTRA_GROUPS`),
typed: split mode's traffic and FLOPs, pruning's counts and savings, both together, and
population expansion's importance weight. A `TrainReport` gives each group as one of these
(`TrainReport.split`, ...) or None when the reply carried none, so the ledger code that
sums them reads fields, never wire or ledger keys. Field names are the ledger names of the
group's scalars, in the same order (tests/test_protocol.py holds them together)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitFigures:
    """Split mode's round: smashed-data traffic, server FLOPs, steps and examples."""

    smashed_bytes_up: int
    smashed_bytes_down: int
    server_flops: float
    split_steps: int
    local_loss_steps: int
    split_examples: int
    local_loss_examples: int
    client_flops_per_example: float
    full_model_flops_per_example: float
    probe_bytes: int  # the FLOP probe's synthetic text crossed the wire too


@dataclass(frozen=True)
class PruningFigures:
    """EL2N pruning's round: examples available and kept, scoring cost, FLOPs saved."""

    examples_available: int
    examples_kept: int
    rescored: int  # 0 or 1
    scoring_flops: float
    flops_saved: float  # net of scoring: negative when scoring cost more


@dataclass(frozen=True)
class PruningSplitFigures:
    """Pruning in split mode: the server FLOPs and smashed bytes scoring cost or saved."""

    server_flops_saved: float
    scoring_smashed_bytes: int
    smashed_bytes_saved: float


@dataclass(frozen=True)
class ImportanceFigures:
    """Population expansion: the mean importance weight of the examples trained."""

    importance_weight: float


# Group name (as in EXTRA_GROUPS) -> its type.
FIGURE_TYPES: dict[str, type] = {"split": SplitFigures, "pruning": PruningFigures,
                                 "pruning_split": PruningSplitFigures,
                                 "importance": ImportanceFigures}

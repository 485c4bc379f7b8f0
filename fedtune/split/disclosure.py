"""What a split run shows the server, and what its epsilon covers: one statement, used by the
ledger, the summary and `fedtune report`, generated from the wire-field table
(`fedtune.wire.fields`) of the server's own config.
"""

from __future__ import annotations

from typing import Any

from fedtune.config import ExperimentConfig, load_config
from fedtune.split.smashed_dp import OVERFLOW_PROBABILITY, slot_count
from fedtune.wire.fields import examples_in_clear, split_rows, wire_fields

# The DP level a split run with DP-SGD but no smashed DP gets in reports: its epsilon is
# real, but it is about the deltas, while the server holds the text and labels in clear.
DELTAS_ONLY = "sample-level DP on deltas only; smashed data in clear"
# A split run with DP-SGD and smashed DP: the epsilon covers everything the client sends.
WITH_SMASHED = "sample-level DP on deltas and smashed data"


def protects_smashed_data(cfg: ExperimentConfig) -> bool:
    return cfg.split.enabled and cfg.split.smashed_dp.enabled and cfg.privacy.sample.enabled


def split_disclosure(cfg: ExperimentConfig) -> dict[str, Any]:
    """The ledger's statement for a split run (empty for a non-split run)."""
    if not cfg.split.enabled:
        return {}
    if not protects_smashed_data(cfg):
        return _in_clear_statement(cfg)
    smashed = cfg.split.smashed_dp
    return {
        # Empty unless privacy.disclose_counts sends counts and losses in clear.
        "server_sees_in_clear": [f.shown for f in examples_in_clear(cfg)],
        "epsilon_sample_covers": "deltas and smashed data (cut-layer activations and "
                                 "body-output gradients, clipped and noised per "
                                 f"{split_rows(cfg).unit})",
        "server_sees_data_size": _data_size(cfg),
        "smashed_dp": {
            "activation_clip_norm": smashed.activation_clip_norm,
            "gradient_clip_norm": smashed.gradient_clip_norm,
            "target_epsilon": smashed.target_epsilon,
            "noise_multiplier": smashed.noise_multiplier or "calibrated per client",
            "rows_per_split_step": slot_count(cfg.train.batch_size),
            "attention_mask_sent": "all ones",
            "neighbouring_relation": "add or remove one example",
            "accounting": "one Poisson-subsampled Gaussian per split step on the DP-SGD "
                          "batch, multiplier (2/sigma^2 + 1/sigma_dpsgd^2)^-1/2, added to "
                          "the client's DP-SGD history",
            "overflow_probability_per_step": OVERFLOW_PROBABILITY,
        },
    }


def in_clear_disclosure(sample_dp: bool = True) -> dict[str, Any]:
    """The statement for split traffic without smashed DP (a round whose config is not at
    hand states the worst case)."""
    sets = ["split.enabled=true", f"privacy.sample.enabled={str(sample_dp).lower()}"]
    return _in_clear_statement(load_config(None, sets))


def _in_clear_statement(cfg: ExperimentConfig) -> dict[str, Any]:
    covers = ("deltas only; smashed data in clear" if cfg.privacy.sample.enabled
              else "nothing: DP-SGD is off")
    return {"server_sees_in_clear": [f.shown for f in examples_in_clear(cfg)],
            "epsilon_sample_covers": covers, "server_sees_data_size": _data_size(cfg),
            "smashed_dp": None}


def _data_size(cfg: ExperimentConfig) -> list[str]:
    return [f.reveals for f in wire_fields(cfg) if f.about == "size"]


def dp_level_label(cfg: ExperimentConfig) -> str | None:
    """The report's DP level for a split run with DP-SGD (None: not such a run)."""
    if not (cfg.split.enabled and cfg.privacy.sample.enabled):
        return None
    return WITH_SMASHED if protects_smashed_data(cfg) else DELTAS_ONLY

"""What a user-level release says of split mode's round figures: under `privacy.user`
(log_cohorts off) every figure that counts or sums over the secret cohort (smashed bytes,
server FLOPs, steps, ...) is the curator's (`fedtune.run.curator_log`), the release keeps
each key with null in every round (an empty cohort's round too), and summary.json's split
totals are null with the reason beside them (issue 26's class, LMATTACK2 1 in split mode)."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.config.load import config_from_toml
from fedtune.run.curator_log import split_record
from fedtune.split.disclosure import split_disclosure
from fedtune.split.ledger_fields import (
    COHORT_FIGURES,
    NULL_TOTALS_NOTE,
    RELEASE_SAFE,
    SUMMARY_TOTALS,
    split_round_fields,
    split_summary_fields,
)
from fedtune.study.report import _load
from fedtune.wire.protocol import TrainReport

SPLIT_USER_DP = """
[data]
num_clients = 6
[train]
clients_per_round = 3
[privacy.sample]
enabled = false
[privacy.user]
enabled = true
[split]
enabled = true
[tuning]
method = "prompt"
"""


def _report(n: int) -> TrainReport:
    """A split client's report, its figures scaled by `n`."""
    extras = {"smashed-bytes-up": 100 * n, "smashed-bytes-down": 90 * n,
              "server-flops": 1e6 * n, "split-steps": 4 * n, "local-loss-steps": n,
              "split-examples": 8 * n, "local-loss-examples": n,
              "client-flops-per-example": 1e5, "full-model-flops-per-example": 1e6 * n,
              "probe-bytes": 7 * n}
    return TrainReport(steps=4, examples_seen=8 * n, flops=1e5 * n, extras=extras)


def _round(text: str, reports: list[TrainReport], rnd: int = 1
           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    cfg = config_from_toml(text)
    up = 300 * len(reports)
    record = {"round": rnd, "clients": len(reports), "bytes_up": up, "bytes_down": up,
              **split_round_fields(reports, up, up, split_disclosure(cfg))}
    return split_record(record, cfg)


def test_split_modes_round_sums_leave_a_user_level_release():
    """Split mode under user-level DP (accepted) adds the cohort's smashed bytes, server
    FLOPs and steps to each round; the release must not keep them (FIX29E's reproducer)."""
    cfg = config_from_toml(SPLIT_USER_DP)
    extras = {"smashed-bytes-up": 100, "smashed-bytes-down": 100, "server-flops": 1e6,
              "split-steps": 4, "local-loss-steps": 0, "split-examples": 8,
              "local-loss-examples": 0, "client-flops-per-example": 1e5,
              "full-model-flops-per-example": 1e6, "probe-bytes": 0}
    reports = [TrainReport(steps=4, examples_seen=8, extras=extras) for _ in range(3)]
    record = {"round": 1, "clients": 3, **split_round_fields(reports, 300, 300, {})}
    public, _ = split_record(record, cfg)
    assert public["smashed_bytes_up"] is None and public["split_steps"] is None


def test_every_split_round_key_is_a_cohort_figure_or_the_statement():
    cfg = config_from_toml(SPLIT_USER_DP)
    keys = set(split_round_fields([_report(1)], 1, 1, split_disclosure(cfg)))
    assert keys == set(COHORT_FIGURES) | set(RELEASE_SAFE)


def test_a_user_level_release_of_split_figures_is_the_same_for_every_cohort():
    """Values and which keys are there: the same for cohorts of other sizes, an empty one
    included; the curator keeps every figure."""
    public_small, curator_small = _round(SPLIT_USER_DP, [_report(1), _report(2)])
    public_large, curator_large = _round(SPLIT_USER_DP, [_report(3), _report(5), _report(7)])
    public_empty, curator_empty = _round(SPLIT_USER_DP, [])
    assert public_small == public_large == public_empty
    assert all(public_small[key] is None for key in COHORT_FIGURES)
    assert public_small["split_privacy"]["epsilon_sample_covers"]  # the statement stays
    assert curator_small is not None and curator_large is not None
    assert curator_small["smashed_bytes_up"] == 300
    assert curator_large["split_steps"] == 60
    assert curator_small["total_bytes"] == 300 + 270 + 21 + 600 + 600
    assert curator_empty is not None and "smashed_bytes_up" not in curator_empty


def test_without_user_level_dp_the_split_figures_stay_in_the_release():
    text = SPLIT_USER_DP.replace("[privacy.user]\nenabled = true\n", "")
    public, curator = _round(text, [_report(1), _report(2)])
    assert curator is None and public["smashed_bytes_up"] == 300


def test_a_non_split_user_level_release_gets_no_split_keys():
    text = SPLIT_USER_DP.replace("[split]\nenabled = true\n", "")
    public, _ = _round(text, [])
    assert not set(public) & set(COHORT_FIGURES)


def test_a_user_level_releases_split_totals_are_null_with_the_reason():
    history = [_round(SPLIT_USER_DP, cohort, rnd)[0]
               for rnd, cohort in enumerate(([_report(1)], [], [_report(2)]), 1)]
    summary = split_summary_fields(history)
    assert {k: summary[k] for k in SUMMARY_TOTALS} == dict.fromkeys(SUMMARY_TOTALS)
    assert summary["split_totals_note"] == NULL_TOTALS_NOTE
    assert summary["split_privacy"] == history[-1]["split_privacy"]
    # The curator's log holds every round's real figures: the real totals are theirs.
    curator = [_round(SPLIT_USER_DP, cohort, rnd)[1]
               for rnd, cohort in enumerate(([_report(1)], [], [_report(2)]), 1)]
    real = split_summary_fields([{**p, **c} for p, c in zip(history, curator, strict=True)
                                 if "smashed_bytes_up" in c])
    assert real["total_smashed_bytes_up"] == 300 and "split_totals_note" not in real


@pytest.mark.parametrize(("smashed", "curve"), [(None, []), (5, [15e-6, 30e-6])])
def test_report_reads_a_split_release_with_null_figures(tmp_path, smashed, curve):
    """`fedtune report` on a split release whose smashed bytes are null draws no upload
    curve (a partial sum would pass for the total) rather than failing."""
    import json

    from fedtune.config import load_config
    from fedtune.run.folder import CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE

    cfg = load_config(None, ["split.enabled=true"])
    (tmp_path / CONFIG_FILE).write_text(cfg.to_toml())
    rounds = [{"round": r, "val_accuracy": 0.5, "bytes_up": 10, "smashed_bytes_up": smashed}
              for r in (1, 2)]
    (tmp_path / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"final_accuracy": 0.6}))
    assert _load(tmp_path).cumulative_mb_up == pytest.approx(curve)

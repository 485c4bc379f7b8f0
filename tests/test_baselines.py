"""Issue 30, item 3: every run carries the majority-class baseline beside the untrained
model's, in summary.json, rounds.jsonl, the console's final line and `fedtune report`; a run
whose final test accuracy does not beat it says so. The majority label comes from the
training partitions only (never the validation rows, never the test split).

The end-to-end check (a 3-class run ending at the majority rate) is in
tests/test_quiet_console.py, which shares one tiny run between both items."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.run.records import RoundRecord, Summary
from fedtune.task.evaluation import majority_fields
from fedtune.task.task import Split


def _split(labels: list[int]) -> Split:
    n = len(labels)
    return Split(np.zeros((n, 4), dtype=np.int64), np.ones((n, 4), dtype=np.int64),
                 np.asarray(labels, dtype=np.int64))


def _task(validation: bool = True):
    # Training rows 0-9: the partitions hold rows 0-6 (label 2 most frequent there); the
    # validation rows 7-9 are all label 0, and label 0 also leads the whole train split;
    # the test split is mostly label 1. Only the partitions may decide the label.
    train = _split([2, 2, 2, 0, 1, 2, 0, 0, 0, 0])
    rows = np.arange(7, 10) if validation else np.zeros(0, dtype=np.int64)
    val = _split([0, 0, 0]) if validation else None
    return SimpleNamespace(train=train, partitions=[np.arange(0, 4), np.arange(4, 7)],
                           test=_split([1, 1, 1, 2, 2, 0]), validation=val,
                           validation_rows=rows, num_labels=3,
                           label_names=("neg", "neutral", "pos"))


def test_majority_label_comes_from_the_training_partitions_only():
    cfg = load_config(None, [])
    got = majority_fields(_task(), cfg)
    assert got == {"majority_label": "pos", "majority_accuracy": pytest.approx(2 / 6),
                   "majority_val_accuracy": 0.0}


def test_with_two_domains_the_majority_label_is_the_target_clients():
    """The accuracy of a two-domain run is the target domain's (its test rows only), so the
    baseline's label comes from the target clients' partitions (the first target_clients),
    not from the source domain that outnumbers them."""
    task = _task()
    # Partition 0 (target): rows 0-3, label 2 leads; partitions 1-2 (source): label 0 leads.
    task.train = _split([2, 2, 2, 0, 0, 0, 0, 0, 0, 0])
    task.partitions = [np.arange(0, 4), np.arange(4, 7), np.arange(7, 10)]
    cfg = load_config(None, ["data.domain_by=collection", "data.target_domain=set2",
                             "data.target_clients=1", "data.num_clients=3",
                             "train.clients_per_round=3"])
    assert majority_fields(task, cfg)["majority_label"] == "pos"
    assert majority_fields(task, load_config(None, []))["majority_label"] == "neg"


def test_majority_is_scored_on_the_rows_the_run_scores():
    cfg = load_config(None, ["train.eval_max_examples=4"])  # the first 4 test rows
    got = majority_fields(_task(validation=False), cfg)
    assert got["majority_accuracy"] == pytest.approx(1 / 4)
    assert got["majority_val_accuracy"] is None  # no validation split: null, not 0


def test_the_records_carry_the_baseline():
    record = RoundRecord(
        round=1, val_accuracy=0.5, val_loss=0.7, epsilon_sample=None, epsilon_user=None,
        delta=None, clients=2, bytes_up=8, bytes_down=8, client_flops=1.0, wall_s=0.1,
        lr=0.1, train_loss=None, sampled=2, no_contribution=False, rejected=[], failed=[],
        per_client=[], forward_layers_skipped=0, privacy={}, privacy_in_clear={}, notes={},
        majority_val_accuracy=0.69)
    keys = list(record.to_json())
    assert record.to_json()["majority_val_accuracy"] == 0.69
    # The contract's leading keys keep their order.
    assert keys[:3] == ["round", "val_accuracy", "val_loss"] and keys[10] == "wall_s"
    summary = Summary(
        accuracy={"final_accuracy": 0.69, "initial_accuracy": 0.22}, initial_evaluated="x",
        epsilon_sample=None, epsilon_user=None, delta=None, notes={}, noise=None,
        privacy_sample=None, privacy_user=None, rounds=1, stopped_early=None,
        total_bytes_up=8, total_bytes_down=8, total_client_flops=1.0, trainable_params=6,
        backbone_params=10, method="bitfit", resumed_at_rounds=[], wall_s=1.0,
        baseline={"majority_label": "a", "majority_accuracy": 0.69,
                  "majority_val_accuracy": 0.7})
    out = summary.to_json()
    assert list(out)[:5] == ["final_accuracy", "initial_accuracy", "majority_label",
                             "majority_accuracy", "majority_val_accuracy"]


def _summary(final: float, majority: float | None) -> dict:
    out = {"wall_s": 3.0, "final_accuracy": final, "initial_accuracy": 0.22,
           "best_val_accuracy": None, "epsilon_sample": None, "epsilon_user": None,
           "total_bytes_up": 10, "trainable_params": 5}
    if majority is not None:
        out["majority_accuracy"] = majority
    return out


def _plain(line: str) -> str:
    from rich.text import Text

    return Text.from_markup(line).plain


def test_final_line_says_when_the_run_did_not_beat_the_majority_class(tmp_path: Path):
    from fedtune.cli import summary_line

    cfg = load_config(None, ["privacy.sample.enabled=false"])
    line = _plain(summary_line(_summary(0.69, 0.69), tmp_path, cfg))
    assert ("final test accuracy 0.6900 (did not beat the majority class (0.6900), "
            "untrained 0.2200)") in line
    line = _plain(summary_line(_summary(0.975, 0.863), tmp_path, cfg))
    assert "final test accuracy 0.9750 (majority class 0.8630, untrained 0.2200)" in line
    assert "did not beat" not in line
    # A summary written before the baseline existed: no claim either way.
    line = _plain(summary_line(_summary(0.9, None), tmp_path, cfg))
    assert "(untrained 0.2200)" in line and "majority" not in line


def _run_folder(folder: Path, acc: float, majority: float | None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        load_config(None, ["privacy.sample.enabled=false", f"seed={len(str(folder))}"]
                    ).to_toml())
    (folder / "rounds.jsonl").write_text(json.dumps(
        {"round": 1, "val_accuracy": acc, "bytes_up": 10}) + "\n")
    summary = {"final_accuracy": acc, "epsilon_sample": None, "epsilon_user": None}
    if majority is not None:
        summary["majority_accuracy"] = majority
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_shows_the_majority_class_and_flags_a_run_that_did_not_beat_it(tmp_path):
    from fedtune.study.report import collect, group, markdown_table

    _run_folder(tmp_path / "a", 0.69, 0.69)
    _run_folder(tmp_path / "bb", 0.69, 0.69)
    table = markdown_table(group(collect([tmp_path])))
    assert table.splitlines()[0].endswith("| upload MB / run | majority class |")
    assert table.splitlines()[-1].endswith("| 0.6900 (not beaten) |")
    _run_folder(tmp_path / "ok" / "c", 0.95, 0.69)
    table = markdown_table(group(collect([tmp_path / "ok"])))
    assert table.splitlines()[-1].endswith("| 0.6900 |")
    # Folders written before the baseline: no column (and no claim).
    _run_folder(tmp_path / "old" / "d", 0.95, None)
    assert "majority" not in markdown_table(group(collect([tmp_path / "old"])))

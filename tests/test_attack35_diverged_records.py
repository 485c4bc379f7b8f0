"""ATTACK35: the global vector at which today's fallback makes the server's validation
direction "no direction" (a finite float32 vector whose gradient overflows) is evaluated
by the same server every round. For a causal LM a non-finite loss is recorded as null
(fedtune.task.lm.evaluate_lm); for a classifier it reaches rounds.jsonl and summary.json
as NaN, which is not JSON (RFC 8259; the run-folder contract's fields are numbers or null)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_robust_validation import _task

from fedtune.config import AggregationConfig
from fedtune.run.ledger import Ledger, read_rounds
from fedtune.task.evaluation import round_metrics
from fedtune.task.kinds import task_kind
from fedtune.task.reference import validation_direction
from strategies import robust


def _cfg():
    return SimpleNamespace(
        task=SimpleNamespace(kind="classification"),
        aggregation=SimpleNamespace(direction_reference_rows=64),
        train=SimpleNamespace(eval_batch_size=128, eval_max_examples=0, prefix_cache="off"),
        split=SimpleNamespace(enabled=False))


def _strict(text: str) -> None:
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a run-folder record"))


def test_a_classifiers_round_record_and_summary_at_a_diverged_global_are_strict_json(
        tmp_path):
    """Adversary: clients (or an honest divergence) that move the global vector, through
    bounded, screened deltas, to a finite float32 vector where the server's logits overflow;
    THREATS.md 4 (a value the clients' input determines reaches the ledger unbounded: NaN)
    and the run-folder contract (a field is a number or null)."""
    task, model = _task(rows=10)
    vector = task.spec.flatten(model.trainable_state()).copy()
    vector[:6] = np.sign(vector[:6]) * np.float32(3e38)  # the head: finite float32
    assert np.isfinite(vector).all()  # pipeline.apply accepts it as the new global
    cfg = _cfg()
    # The fallback of dd6892a engages at this vector: the run goes on ...
    reference = validation_direction(task, model, vector, cfg)
    assert not np.isfinite(reference).all()
    rows = np.random.default_rng(0).normal(size=(5, task.spec.size))
    checked = robust.aggregate(rows, np.ones(5), AggregationConfig(
        norm_bound=1.0, norm_bound_direction="validation"), reference=reference)
    assert checked.figures["norm_bound"]["direction"]["reference_finite"] is False
    # ... and the same round's validation figures go into its record.
    metrics = round_metrics(task, model, vector, cfg)
    ledger = Ledger(tmp_path)
    ledger.append_round({"round": 1, **metrics, "aggregation": checked.figures})
    assert read_rounds(tmp_path)[0]["round"] == 1
    _strict((tmp_path / "rounds.jsonl").read_text())
    # The summary's test figures of the same (final) model.
    final_test = task_kind("classification").evaluate(model, task.validation, 128)
    summary = task_kind("classification").summary_fields(
        [{"round": 1, **metrics}], {"val_accuracy": 0.5, "test_accuracy": 0.5}, final_test, 10)
    ledger.write_summary(summary)
    _strict((tmp_path / "summary.json").read_text())


def test_a_classifiers_null_loss_is_shown_as_diverged_not_as_no_validation_split():
    """The console reads the same record: a null loss beside an accuracy is a diverged
    model (the log says so), never a missing validation split."""
    from fedtune.cli import round_line
    from fedtune.config import load_config

    cfg = load_config(None, [])
    rec = {"round": 3, "val_accuracy": 0.5, "val_loss": None, "epsilon_sample": None,
           "epsilon_user": None, "clients": 2, "bytes_up": 10, "wall_s": 1.0}
    line = round_line(rec, cfg)
    assert "val acc 0.5000  val loss null (diverged, see run.log)" in line
    no_split = round_line({**rec, "val_accuracy": None}, cfg)
    assert "no validation split" in no_split and "diverged" not in no_split
    assert "val loss 0.2500" in round_line({**rec, "val_loss": 0.25}, cfg)

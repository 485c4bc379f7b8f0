"""The validation split: carved from the training rows (never test), held by the server (no
client's partition holds a row of it), seeded; and everything that selects reads it while
the test split is read for the final model only."""

from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.data import PartitionError, load_corpus, target_rows
from fedtune.data.validation_split import carve_validation
from fedtune.task.evaluation import accuracy_fields, final_metrics, initial_metrics, round_metrics
from fedtune.task.task import Split, get_task

ROOT = Path(__file__).resolve().parents[1]
SETS = ["data.num_clients=7", "model.max_length=32", "tuning.prompt.length=4",
        "train.eval_max_examples=48", "train.eval_batch_size=48"]


def _cfg(*extra: str):
    return load_config(ROOT / "experiments/quickstart.toml", [*SETS, *extra])


def test_quickstart_holds_out_a_few_hundred_training_rows_no_client_sees():
    task = get_task(_cfg())
    n_train = len(task.train)
    rows = task.validation_rows
    assert 200 <= rows.size <= 600 and rows.size == pytest.approx(0.1 * n_train, abs=2)
    assert len(np.unique(rows)) == rows.size and rows.min() >= 0 and rows.max() < n_train
    held = np.concatenate(task.partitions)
    assert not np.intersect1d(held, rows).size  # no client trains on a validation row
    # Nothing lost either: every training row is a client's or the server's.
    np.testing.assert_array_equal(np.sort(np.concatenate([held, rows])), np.arange(n_train))
    val = task.validation
    np.testing.assert_array_equal(val.labels, task.train.labels[rows])
    np.testing.assert_array_equal(val.input_ids, task.train.input_ids[rows])
    # Stratified: each label keeps its share of the training rows.
    for label in (0, 1):
        share = (task.train.labels == label).mean()
        assert (val.labels == label).mean() == pytest.approx(share, abs=2 / rows.size)


def test_validation_rows_are_never_test_rows():
    task = get_task(_cfg())
    train_ids = list(load_corpus("spamassassin")["train"]["id"])
    test_ids = set(load_corpus("spamassassin")["test"]["id"])
    assert not {train_ids[i] for i in task.validation_rows} & test_ids


def test_carve_is_seeded_and_its_prefix_is_a_fair_sample():
    labels = np.repeat([0, 1], [700, 300])  # grouped by label, as some corpora come
    a = carve_validation(labels, 0.2, seed=3)
    np.testing.assert_array_equal(a, carve_validation(labels, 0.2, seed=3))
    assert not np.array_equal(np.sort(a), np.sort(carve_validation(labels, 0.2, seed=4)))
    assert a.size == 200 and (labels[a] == 1).sum() == 60
    # Seeded random order, not index order: the first 50 are not all of one label.
    assert 0 < labels[a[:50]].sum() < 50


def test_carve_draws_only_among_the_given_rows():
    labels = np.zeros(100, dtype=np.int64)
    among = np.arange(40, 60)
    rows = carve_validation(labels, 0.5, seed=0, among=among)
    assert rows.size == 10 and set(rows) <= set(among)


def test_carve_passes_over_rows_with_a_copy_and_keeps_its_size_and_order():
    from fedtune.data.validation_split import passed_over

    labels = np.repeat([0, 1], [700, 300])
    plain = carve_validation(labels, 0.2, seed=3)
    copied = np.zeros(labels.size, dtype=bool)
    np.testing.assert_array_equal(carve_validation(labels, 0.2, seed=3, copied=copied), plain)
    copied[plain[:5]] = True  # five rows the plain carve takes have a copy
    copied[np.setdiff1d(np.arange(labels.size), plain)[:50]] = True  # and some it leaves
    rows = carve_validation(labels, 0.2, seed=3, copied=copied)
    assert not copied[rows].any() and rows.size == plain.size
    assert (labels[rows] == 1).sum() == (labels[plain] == 1).sum()  # still stratified
    # Every other draw stays: the seeded order only skips the marked rows.
    assert np.setdiff1d(plain, rows).size == 5
    np.testing.assert_array_equal(rows, carve_validation(labels, 0.2, seed=3, copied=copied))
    assert passed_over(labels, 0.2, 3, None, copied) == 5


def test_a_fraction_that_carves_nothing_is_an_error_naming_the_field():
    with pytest.raises(PartitionError, match="data.validation_fraction=0.001 .* 0 of 30"):
        carve_validation(np.zeros(30, dtype=np.int64), 0.001, seed=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_config_rejects_a_fraction_outside_0_1(bad):
    with pytest.raises(ConfigError, match=r"data.validation_fraction must be in \[0, 1\)"):
        load_config(None, [f"data.validation_fraction={bad}"])


def test_fraction_0_disables_it_and_clients_get_every_training_row():
    task = get_task(_cfg("data.validation_fraction=0"))
    assert task.validation is None and task.validation_rows.size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(task.partitions)),
                                  np.arange(len(task.train)))


def test_with_two_domains_validation_rows_are_target_rows_outside_every_partition():
    task = get_task(_cfg("data.num_clients=8", "data.partition=iid",
                         "data.domain_by=collection", "data.target_domain=set2",
                         "data.target_clients=4"))
    target = target_rows(load_corpus("spamassassin")["train"], "collection", "set2", "train")
    assert set(task.validation_rows) <= set(target)
    assert task.validation_rows.size == pytest.approx(0.1 * target.size, abs=2)
    assert not np.intersect1d(np.concatenate(task.partitions), task.validation_rows).size


class _Sealed(Split):
    """A split that must not be read."""

    def tensors(self, indices=None):
        raise AssertionError("the test split was read by a per-round (selecting) evaluation")


def test_rounds_are_evaluated_on_validation_and_never_read_test():
    task = get_task(_cfg())
    model = task.new_model()
    vector = task.initial_vector()
    sealed_task = _with_test(task, _Sealed(task.test.input_ids, task.test.attention_mask,
                                           task.test.labels))
    metrics = round_metrics(sealed_task, model, vector, task.cfg)
    # A classifier's perplexity field is null, never missing (the causal-LM kind fills it).
    assert set(metrics) == {"val_accuracy", "val_loss", "val_perplexity"}
    assert metrics["val_perplexity"] is None
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["val_loss"] > 0
    final = final_metrics(task, model, vector, task.cfg)
    assert final["examples"] == 48  # train.eval_max_examples caps it


def test_without_validation_no_round_is_evaluated():
    task = get_task(_cfg("data.validation_fraction=0"))
    sealed = _with_test(task, _Sealed(task.test.input_ids, task.test.attention_mask,
                                      task.test.labels))
    assert round_metrics(sealed, task.new_model(), task.initial_vector(), task.cfg) == {
        "val_accuracy": None, "val_loss": None, "val_perplexity": None}
    initial = initial_metrics(task, task.new_model(), task.initial_vector(), task.cfg)
    assert initial["val_accuracy"] is None and 0.0 <= initial["test_accuracy"] <= 1.0


def _with_test(task, test):
    import dataclasses

    return dataclasses.replace(task, test=test)


HISTORY = [{"round": 1, "val_accuracy": 0.70, "val_loss": 0.6},
           {"round": 2, "val_accuracy": 0.82, "val_loss": 0.5},
           {"round": 3, "val_accuracy": 0.82, "val_loss": 0.4},
           {"round": 4, "val_accuracy": 0.78, "val_loss": 0.45}]
INITIAL = {"test_accuracy": 0.69, "test_loss": 0.7, "val_accuracy": 0.68, "val_loss": 0.71}
FINAL_TEST = {"accuracy": 0.91, "loss": 0.3, "examples": 1208.0}


def test_best_accuracy_is_the_validation_figure_and_final_accuracy_the_final_test():
    fields = accuracy_fields(HISTORY, INITIAL, FINAL_TEST, validation_examples=468)
    assert fields["best_round"] == 2  # the first round that reached the best
    assert fields["best_val_accuracy"] == fields["best_accuracy"] == 0.82
    assert fields["final_val_accuracy"] == 0.78
    assert (fields["final_accuracy"], fields["final_loss"]) == (0.91, 0.3)
    assert (fields["test_examples"], fields["validation_examples"]) == (1208, 468)
    assert (fields["initial_accuracy"], fields["initial_val_accuracy"]) == (0.69, 0.68)


def test_without_validation_nothing_is_selected():
    history = [{**r, "val_accuracy": None, "val_loss": None} for r in HISTORY]
    fields = accuracy_fields(history, {**INITIAL, "val_accuracy": None, "val_loss": None},
                             FINAL_TEST, validation_examples=0)
    for key in ("best_round", "best_val_accuracy", "best_accuracy", "final_val_accuracy",
                "initial_val_accuracy"):
        assert fields[key] is None, key
    assert fields["final_accuracy"] == 0.91


def test_report_curves_are_validation_figures_and_runs_without_them_draw_none(tmp_path):
    import json

    from fedtune.study.report import collect, group, write_report

    for name, key in (("with", "val_accuracy"), ("old", "accuracy")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.toml").write_text(
            load_config(None, [f"seed={int(name == 'old')}"]).to_toml())
        (folder / "rounds.jsonl").write_text("".join(
            json.dumps({"round": r, key: 0.5 + r / 10, "bytes_up": 1000}) + "\n"
            for r in (1, 2)))
        (folder / "summary.json").write_text(json.dumps({
            "final_accuracy": 0.8, "epsilon_sample": 7.5, "epsilon_user": None}))
    runs = {r.folder.name: r for r in collect([tmp_path])}
    # A per-round test accuracy (folders from before the split) is never drawn as validation.
    assert runs["with"].accuracy_by_round == [0.6, 0.7] and runs["old"].accuracy_by_round == []
    written = write_report(group(list(runs.values())), tmp_path / "report")
    assert all(p.stat().st_size > 0 for p in written)

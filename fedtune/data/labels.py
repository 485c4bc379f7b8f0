"""A corpus's labels, checked before they become classes: a typo ("Spam" beside "spam") or
a label seen only in the test split would otherwise load as one more class, which the
model never learns and the run never mentions.

With declared labels (`data.labels`) every row's label must be one of them (or, as an
integer, an id into them) and the classes follow the declared order; without, the training
split's labels are the classes: a test-only label and labels that differ only in case or
surrounding spaces are refused, each with the lines that hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedtune.data.row_origin import Place, places_text

if TYPE_CHECKING:
    import datasets

# (split, row in the returned split) -> where that row came from
Locate = Callable[[str, int], Place]


class LabelError(ValueError):
    """A label that is not one of the classes; the message names its lines."""


def label_key(label: str) -> str:
    """What near-duplicate labels share: the label without case or surrounding spaces."""
    return label.strip().casefold()


def near_duplicates(labels: Sequence[str]) -> list[list[str]]:
    """Groups of distinct labels that are the same label but for case or spaces."""
    groups: dict[str, list[str]] = {}
    for label in dict.fromkeys(labels):
        groups.setdefault(label_key(label), []).append(label)
    return [group for group in groups.values() if len(group) > 1]


def _rows_with(values: Sequence[Any], wanted: Any) -> list[int]:
    return [i for i, v in enumerate(values) if v == wanted]


def check_string_labels(splits: dict[str, Sequence[str]], declared: Sequence[str] | None,
                        locate: Locate) -> list[str]:
    """The class names for string labels (`splits`: split -> its labels): the declared
    ones, else the sorted training labels. Raises LabelError naming the rows of a label
    outside the declared set, of near-duplicate labels, or of a test-only label."""
    if declared:
        allowed = set(declared)
        for split, values in splits.items():
            for label in dict.fromkeys(values):
                if label not in allowed:
                    rows = [locate(split, i) for i in _rows_with(values, label)]
                    raise LabelError(f"{places_text(rows)}: label {label!r} is not one of "
                                     f"data.labels {list(declared)}; fix the label or "
                                     "declare it")
        return list(declared)
    every = [label for values in splits.values() for label in values]
    for group in near_duplicates(every):
        counts = {label: every.count(label) for label in group}
        parts = []
        for label in sorted(group, key=lambda x: (counts[x], x)):  # the rarest first
            rows = [locate(split, i) for split, values in splits.items()
                    for i in _rows_with(values, label)]
            parts.append(f"{label!r} at {places_text(rows)}")
        raise LabelError(f"labels {', '.join(map(repr, group))} differ only in case or "
                         f"spaces: {'; '.join(parts)}; make them one label, or declare "
                         "the classes in data.labels")
    _check_trained(splits, locate)
    return sorted(set(every))  # the training labels, once the checks passed


def check_label_ids(splits: dict[str, Sequence[int]], declared: Sequence[str] | None,
                    locate: Locate) -> None:
    """Integer labels: ids into the declared labels, else any label the training split
    holds (a test-only id is refused with its rows)."""
    if not declared:
        _check_trained(splits, locate)
        return
    for split, values in splits.items():
        for label in dict.fromkeys(values):
            if not 0 <= label < len(declared):
                rows = [locate(split, i) for i in _rows_with(values, label)]
                raise LabelError(f"{places_text(rows)}: label {label!r} is not an id "
                                 f"0..{len(declared) - 1} of data.labels {list(declared)}")


def _check_trained(splits: dict[str, Sequence[Any]], locate: Locate) -> None:
    trained = set(splits["train"])
    if len(trained) < 2:
        return  # the corpus check names the one class the training split holds
    for split, values in splits.items():
        if split == "train":
            continue
        for label in dict.fromkeys(values):
            if label not in trained:
                rows = [locate(split, i) for i in _rows_with(values, label)]
                raise LabelError(f"label {label!r} is only in the {split} split "
                                 f"({places_text(rows)}): the model never trains on it; fix "
                                 "the label, or give the training data rows with it")


def check_class_names(names: Sequence[str], declared: Sequence[str] | None, where: str
                      ) -> None:
    """A dataset whose labels are already classes (a ClassLabel) against `data.labels`."""
    if declared and list(names) != list(declared):
        raise LabelError(f"{where} has the classes {list(names)}; data.labels declares "
                         f"{list(declared)} (the same names in the same order, or none)")


def as_class_label(ds: datasets.Dataset, names: Sequence[str]) -> datasets.Dataset:
    """`ds` with its label column as the classes `names` (string labels by name, integer
    labels as ids)."""
    import datasets

    feature = ds.features["label"]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # CSV text arrives as large_string, which ClassLabel cannot be cast from.
        ds = ds.cast_column("label", datasets.Value("string"))
    return ds.cast_column("label", datasets.ClassLabel(names=list(names)))

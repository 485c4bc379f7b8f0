"""ATTACK29F: with `aggregation.norm_bound_direction = "validation"` the released model's
weights depend on the server's first `direction_reference_rows` validation rows (they pick
which clients' deltas the round keeps), which no DP mechanism covers (docs/privacy.md says
so). The exported model's privacy statement (`fedtune.run.export.privacy_statement`, what a
model's user reads next to `epsilon_sample`) says nothing of it: the epsilon is shown with
"secret noise" as its only note, for a model that a set of unprotected rows steered."""

from fedtune.config import load_config
from fedtune.run.export import privacy_statement

SETS = ["privacy.sample.enabled=true", "privacy.sample.target_epsilon=8",
        "aggregation.rule=mean", "aggregation.norm_bound=adaptive",
        "aggregation.norm_bound_direction=validation", "aggregation.tolerate=1"]


def _text(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k} {_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    return str(value)


def test_the_exported_statement_names_the_validation_rows_the_model_depends_on():
    """Adversary: whoever sees the released model (it depends on the server's validation
    rows); invariant: THREATS 3 (the statement next to each epsilon says what reaches the
    release and what the epsilon does not cover)."""
    cfg = load_config(None, SETS)
    fields = privacy_statement(cfg, {"epsilon_sample": 7.9, "epsilon_user": None,
                                     "delta": 1e-5})
    assert fields["epsilon_sample"] == 7.9
    text = _text(fields).lower()
    assert "validation" in text, (
        "the export states epsilon_sample for a model steered by the server's validation "
        f"rows (norm_bound_direction='validation') without naming them: {fields}")

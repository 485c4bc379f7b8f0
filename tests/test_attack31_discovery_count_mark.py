"""ATTACK31: the epsilon marks are decided from the config alone, and "counts disclosed"
only looks at the train reply (`_counts_disclosed`: `f.message == TRAIN`). A deployment
node that trains on its own data file sends its exact example count at discovery whatever
the config says (`fedtune.wire.fields._own_examples`: "under DP it is outside
epsilon_sample, like `num_examples` with disclose_counts"); the server plans and weights by
it. Under DP-SGD the run's epsilon_sample is then shown (console, summary.json's note,
exports) with no mark and a note that names only the secret noise: an epsilon next to an
exact count it does not protect."""

from fedtune.config import load_config
from fedtune.run.epsilon_marks import epsilon_marks, epsilon_note
from fedtune.wire.fields import DISCOVERY, examples_in_clear


def test_the_epsilon_note_names_the_own_data_count_sent_in_clear_at_discovery():
    """Adversary: the server (honest-but-curious) that reads each own-file node's exact
    example count; invariant: THREATS 3 (the statement next to each epsilon says what left
    in clear outside it) and "a mechanism's epsilon is never shown next to data it does not
    protect"."""
    cfg = load_config(None, ["privacy.sample.enabled=true"])
    outside = [f.item for f in examples_in_clear(cfg) if f.message == DISCOVERY]
    assert outside == ["own-data example count"]  # the wire table's own statement
    note = epsilon_note(cfg, "sample", 7.9) or ""
    marks = [m.tag for m in epsilon_marks(cfg, "sample")]
    assert "count" in note, (
        f"epsilon_sample's note {note!r} (marks {marks}) says nothing of the "
        f"{outside} a node sends in clear at discovery, outside this epsilon")

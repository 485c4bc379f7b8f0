"""What leaves a client, for the ledger's privacy section (`privacy_in_clear`): generated
from the one wire-field table (`fedtune.wire.fields`), which tests compare with what real
runs send.

The epsilons cover what the model release says about a client's data (user level) or what
its uploads say about one example (sample level, DP-SGD). `sent` names every field a reply
(or the split body) receives with what it reveals and its protection; `withheld` names what
stays on the client (under DP unless `privacy.disclose_counts`, and under
`privacy.user.withhold_metrics`).
"""

from __future__ import annotations

from fedtune.config import ExperimentConfig
from fedtune.wire.fields import statement


def in_clear(cfg: ExperimentConfig) -> dict[str, object]:
    """{"sent": {item: what it reveals [protection]}, "withheld": [items],
    "disclose_counts": bool}."""
    return statement(cfg)

"""Attack (class 3, user-level DP): the release (rounds.jsonl, summary.json: "may be
shared", fedtune.run.curator_log) must carry nothing about the secret Poisson cohort beyond the
noised aggregate. A real in-process run shows it still carries the cohort's exact size
(`clients`, `sampled`), sums over its members (`bytes_up`, `client_flops`, and their
totals) and the unnoised mean of its members' losses (`train_loss`)."""

import json
import numbers

import pytest
from inline_grid import TINY, inline_run

from fedtune.config import load_config
from fedtune.run.curator_log import read_curator

pytestmark = pytest.mark.usefixtures("task_identity")

# q = 2/3: the cohort is a secret Poisson draw of the 3 partitions.
USER = ["privacy.sample.enabled=false", "privacy.user.enabled=true",
        "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50",
        "privacy.user.clipping=client", "train.clients_per_round=2"]
COHORT_DERIVED = ("clients", "sampled", "bytes_up", "client_flops", "train_loss")
SUMMARY_DERIVED = ("total_bytes_up", "total_client_flops")


def test_attackb_user_dp_release_has_no_cohort_figures(tmp_path, monkeypatch):
    """Under user-level DP no cohort size, cohort sum or unnoised cohort loss is released
    outside curator_log.jsonl."""
    # Three rounds: a single round's secret draw is empty with probability (1/3)^3 = 1/27,
    # and a run in which no round had a cohort ends in NoContributionError (flaky).
    cfg = load_config(None, [*TINY, *USER, "train.rounds=3"])
    out = tmp_path / "run"
    summary, _, _ = inline_run(cfg, out, monkeypatch)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    cohort = len(read_curator(out)[0]["per_client"])
    leaked = {k: rounds[0][k] for k in COHORT_DERIVED
              if isinstance(rounds[0].get(k), numbers.Number)
              and not isinstance(rounds[0].get(k), bool)}
    saved = json.loads((out / "summary.json").read_text())
    leaked |= {f"summary.{k}": saved[k] for k in SUMMARY_DERIVED
               if isinstance(saved.get(k), numbers.Number) and saved[k]}
    assert not leaked, (f"the release carries figures of the secret cohort (size {cohort} "
                        f"in the curator's log): {leaked}")

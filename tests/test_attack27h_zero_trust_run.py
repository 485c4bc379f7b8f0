"""ATTACK27H: a run in which every round is refused for zero trust (`direction_weighting =
"cosine"`: no row has a positive cosine to the server's validation direction) ends with
NoContributionError saying that every sampled client "failed, was rejected or was not
sampled", and no summary.json, although every client replied and was accepted."""

import json

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.run.ledger import NoContributionError
from strategies import pipeline
from strategies.trust_weighting import ZERO_TRUST

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.slow
def test_a_run_whose_every_round_is_refused_for_zero_trust_says_so(tmp_path, monkeypatch):
    """Honest clients all against the server's rows (class 4: a refusal is named, never a crash)."""
    # The server's validation rows point away from every client's data (a non-IID cohort:
    # population_expansion's target rows, or a skewed root set): stood in for by a server
    # direction against the cohort's consensus (minus the sum of the rows' directions), so
    # that every honest row scores below 0 whatever the tiny model learns.
    from inline_grid import TINY, inline_run

    real = pipeline.combine

    def against_the_cohort(accepted, weights, rule, reference, cohort):
        if reference is not None and accepted:
            reference = -sum(a.delta / np.linalg.norm(a.delta) for a in accepted)
        return real(accepted, weights, rule, reference, cohort)

    monkeypatch.setattr(pipeline, "combine", against_the_cohort)
    sets = [*TINY, "train.clients_per_round=3", "train.rounds=2", "privacy.sample.enabled=false",
            "aggregation.norm_bound=adaptive", "aggregation.norm_bound_direction=validation",
            "aggregation.direction_weighting=cosine", "aggregation.direction_reference_rows=8"]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    try:
        inline_run(cfg, out, monkeypatch)
        error = None
    except NoContributionError as exc:
        error = str(exc)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # The setting of the case: every round refused for zero trust, every reply accepted.
    assert [r.get("update_refused") for r in records] == [ZERO_TRUST] * len(records)
    assert all(r["clients"] == r["sampled"] > 0 and not r["rejected"] and not r["failed"]
               for r in records)
    assert error is None or "refused" in error, (
        f"the run ended with: {error!r}; summary.json written: {(out / 'summary.json').exists()}")

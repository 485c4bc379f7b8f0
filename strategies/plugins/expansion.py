"""Population expansion with domain adaptation (Koga et al. 2023): a small target
population (partition ids below `data.target_clients`) trains together with clients of a
related source domain (the other ids), and domain adaptation decides how much each source
client counts.

`weighting`:

- `fixed`: every source client's delta counts `lam` times a target client's.
- `anneal`: the source weight falls linearly from `lam` in round 1 to 0 after
  `anneal_rounds` rounds; from then on source clients are not asked to train at all.
- `importance`: a domain classifier (`tuning.domain_head`, trained federatedly with the
  task under the same DP) scores target vs source; a source client weights each of its
  examples' loss by p(target|x) / p(source|x) under the current model, clipped at
  `max_weight`. Source deltas also count `lam`.

`fixed` and `anneal` read partition ids only, so they serve every task kind (a causal LM's
rows have no label and its model no pooled-feature head: `importance` is refused there, by
fedtune.config.task).

Privacy: weights are at most 1, applied after clipping, so one client still moves the sum
by at most the clip norm; user-level accounting samples over the whole expanded population
(q = cohort / data.num_clients). Dropping a sampled source client whose weight is 0 is the
same release as adding its delta times 0, so the accounting is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.config import ConfigError
from strategies.plugins.base import Plugin, register_plugin

if TYPE_CHECKING:
    from strategies.pipeline import ClientReport

# fedtune.wire.protocol (torch, Flower) is imported where a round uses it: `fedtune run` imports
# the plugins to validate a config before Ray starts.

WEIGHTINGS = ("fixed", "anneal", "importance")


@register_plugin
class PopulationExpansion(Plugin):
    name = "population_expansion"
    params = {"weighting": (str, "fixed"), "lam": (float, 1.0), "anneal_rounds": (int, 0),
              "max_weight": (float, 5.0)}

    @classmethod
    def check(cls, params: dict[str, Any], cfg: Any, where: str) -> None:
        if params["weighting"] not in WEIGHTINGS:
            raise ConfigError(f"{where}.weighting={params['weighting']!r} is not one of: "
                              f"{', '.join(WEIGHTINGS)}")
        if not 0.0 <= params["lam"] <= 1.0:
            raise ConfigError(f"{where}.lam must be in [0, 1] (a weight above 1 would raise "
                              f"a client's DP sensitivity), got {params['lam']!r}")
        if params["anneal_rounds"] < 0:
            raise ConfigError(f"{where}.anneal_rounds must be >= 0 (0: train.rounds), got "
                              f"{params['anneal_rounds']!r}")
        if not params["max_weight"] > 0:
            raise ConfigError(f"{where}.max_weight must be > 0, got {params['max_weight']!r}")
        if not cfg.data.domain_by or cfg.data.source_clients == 0:
            raise ConfigError(f"{where}: population_expansion needs a source population: set "
                              "data.domain_by, data.target_domain and data.target_clients "
                              "below data.num_clients")
        if params["weighting"] == "importance":
            if not cfg.tuning.domain_head:
                raise ConfigError(f"{where}: weighting='importance' needs the domain "
                                  "classifier: set tuning.domain_head = true")
            if cfg.split.enabled:
                raise ConfigError(f"{where}: weighting='importance' needs the whole model on "
                                  "the client (its domain head reads the pooled features); "
                                  "with split.enabled use 'fixed' or 'anneal'")
            if cfg.privacy.sample.enabled and cfg.privacy.sample.grad_sample_mode == "ghost":
                raise ConfigError(f"{where}: weighting='importance' weights each example's "
                                  "loss, which grad_sample_mode='ghost' cannot take; use "
                                  "'hooks'")

    def _is_source(self, pid: int) -> bool:
        return pid >= self.cfg.data.target_clients

    def source_weight(self, rnd: int) -> float:
        if self.weighting != "anneal":
            return self.lam
        span = self.anneal_rounds or self.cfg.train.rounds
        return self.lam * max(0.0, 1.0 - (rnd - 1) / span)

    def client_weight(self, rnd: int, pid: int) -> float:
        return self.source_weight(rnd) if self._is_source(pid) else 1.0

    def select_cohort(self, rnd: int, pids: list[int]) -> list[int]:
        if self.source_weight(rnd) > 0:
            return pids
        return [p for p in pids if not self._is_source(p)]

    def client_config(self, rnd: int, pid: int) -> dict[str, Any]:
        if self.weighting != "importance":
            return {}
        from fedtune.wire.protocol import DomainSettings

        return {"domain": DomainSettings(is_target=not self._is_source(pid),
                                         max_weight=self.max_weight)}

    def report_groups(self) -> tuple[str, ...]:
        return ("importance",) if self.weighting == "importance" else ()

    # The weighting and this round's source weight follow from the config alone; the
    # counts and the mean importance weight describe the secret cohort (curator's log
    # under user-level DP: fedtune.run.curator_log).
    extras_keys = frozenset({"expansion"})
    release_safe = frozenset({"expansion.weighting", "expansion.source_weight"})

    def extras(self, rnd: int, clients: Sequence[ClientReport]) -> dict[str, Any]:
        target = self.cfg.data.target_clients
        source = [c for c in clients if c.partition_id >= target]
        extras: dict[str, Any] = {
            "weighting": self.weighting,
            "source_weight": self.source_weight(rnd),
            "target_clients": len(clients) - len(source),
            "source_clients": len(source),
        }
        # There every round (null without an importance report: always under 'fixed' and
        # 'anneal'), so its presence never tells whether the cohort held a source client.
        weights = [i.importance_weight for c in source
                   if (i := c.report.importance) is not None]
        extras["source_importance_weight_mean"] = float(np.mean(weights)) if weights else None
        return {"expansion": extras}

"""Dataset pruning by EL2N (Paul et al. 2021; used by SFPrompt): each client scores its
examples under the current global model, ||softmax(f(x)) - onehot(y)||_2 from one forward
pass, and trains only on the highest-scoring fraction `keep`.

The server side only tells clients the rule (`fedtune.wire.protocol.PruneSettings`);
scoring and selection run on the client (`clients/plugins/el2n.py`; a split client scores
through the body service, forward only), which rescores at its first participation and then
whenever `every` rounds have passed since its last scoring (0: never again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedtune.config import ConfigError
from strategies.plugins.base import Plugin, register_plugin

if TYPE_CHECKING:
    from strategies.pipeline import ClientReport

# fedtune.wire.protocol (torch, Flower) is imported where a round uses it: `fedtune run` imports
# the plugins to validate a config before Ray starts.

SELECTION_CAVEAT = ("el2n_pruning selects training examples by their loss outside DP-SGD: "
                    "the sample-level epsilon does not cover that selection")


@register_plugin
class EL2NPruning(Plugin):
    name = "el2n_pruning"
    params = {"keep": (float, None), "every": (int, 0),
              "allow_with_sample_dp": (bool, False)}

    @classmethod
    def check(cls, params: dict[str, Any], cfg: Any, where: str) -> None:
        if not 0.0 < params["keep"] <= 1.0:
            raise ConfigError(f"{where}.keep must be in (0, 1], got {params['keep']!r}")
        if params["every"] < 0:
            raise ConfigError(f"{where}.every must be >= 0, got {params['every']!r}")
        if cfg.privacy.sample.enabled and not params["allow_with_sample_dp"]:
            raise ConfigError(
                f"{where}: {SELECTION_CAVEAT}. Turn privacy.sample off (user-level DP "
                f"covers it), or set {where}.allow_with_sample_dp = true to run anyway "
                "with that caveat in the ledger")

    def client_config(self, rnd: int, pid: int) -> dict[str, Any]:
        from fedtune.wire.protocol import PruneSettings

        return {"prune": PruneSettings(keep=self.keep, every=self.every)}

    @classmethod
    def sizes_per_round(cls, params: dict[str, Any]) -> int:
        return 1

    def trained_sizes(self, n: int) -> list[int]:
        from fedtune.wire.protocol import PruneSettings

        # Every round, the kept share only: a client scores before it trains, at its first
        # participation too (`clients/plugins/el2n.py` `select`), so it never trains on all
        # n (tests/test_plugins.py holds the two sides together). Charging all n
        # as well would over-charge every round.
        return [PruneSettings(self.keep, self.every).kept(n)]

    def report_groups(self) -> tuple[str, ...]:
        return ("pruning",)

    # `keep` and the caveat follow from the config alone; the sums describe the secret
    # cohort (curator's log under user-level DP: fedtune.run.curator_log).
    extras_keys = frozenset({"pruning", "privacy_caveats"})
    release_safe = frozenset({"pruning.keep", "privacy_caveats"})

    def extras(self, rnd: int, clients: Sequence[ClientReport]) -> dict[str, Any]:
        pruned = [(c.report, p) for c in clients if (p := c.report.pruning) is not None]
        extras: dict[str, Any] = {
            "pruning": {
                "keep": self.keep,
                "examples_available": sum(p.examples_available for _, p in pruned),
                "examples_kept": sum(p.examples_kept for _, p in pruned),
                "examples_trained": sum(r.examples_seen or 0 for r, _ in pruned),
                "clients_rescored": sum(int(p.rescored) for _, p in pruned),
                "scoring_flops": sum(p.scoring_flops for _, p in pruned),
                "flops_saved": sum(p.flops_saved for _, p in pruned),
            }}
        split = [s for r, _ in pruned if (s := r.pruning_split) is not None]
        # Split mode: what scoring cost and pruning saved on the wire and server; there
        # every round (zeros without a report), so the keys never tell the cohort's size.
        if self.cfg.split.enabled:
            extras["pruning"].update({
                "scoring_smashed_bytes": sum(s.scoring_smashed_bytes for s in split),
                "smashed_bytes_saved": sum(s.smashed_bytes_saved for s in split),
                "server_flops_saved": sum(s.server_flops_saved for s in split),
            })
        if self.cfg.privacy.sample.enabled:
            extras["privacy_caveats"] = [SELECTION_CAVEAT]
        return extras

"""What a client releases, as the server plans and charges it: a pure view of the run's
privacy plan (`fedtune.privacy.plan`) and the hooks that add to it, holding no spend.

The ledger (`strategies.privacy_ledger`) charges from it, discovery's claim admission
(`strategies.claim_admission`) checks a node's plan with it, and the released bound under a
secret cohort is built from it, so the three count a client's releases the same way:
- `charged_over`: a client trained in each of some rounds as `PrivacyLedger.planned`
  charges it: the costliest example count a plugin allows given what it spent so far, and
  the hooks' releases (split mode's smashed data);
- `every_round`: each of those rounds charged every release the plan allows (each size,
  each hook's release): the released bound's history under a secret cohort, which does not
  depend on who was sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.accounting import max_steps
from fedtune.privacy.plan import PrivacyPlan, Release

# (round, partition id, partition size) -> further DP releases the client makes in that
# round besides its DP-SGD steps (split mode: the noised smashed data), as (sigma, q, steps).
PlanHook = Callable[[int, int, int], list[Release]]
# Example count n -> the other counts a client of n may train on (plugins: pruning).
SizeHook = Callable[[int], list[int]]


class ReleasePlan:
    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.plan_hooks: list[PlanHook] = []
        self.size_hooks: list[SizeHook] = []
        self._charged_cache: dict[tuple[int, int, tuple[int, ...]], DPHistory] = {}

    def releases(self, n: int) -> list[Release]:
        """The DP-SGD release of each example count a client of `n` may train on."""
        sizes = sorted({n, *(m for hook in self.size_hooks for m in hook(n))})
        return [self.plan.release(m) for m in sizes]

    def hooked(self, rnd: int, pid: int, n: int) -> list[Release]:
        """The hooks' releases of client `pid` (of `n` examples) trained in round `rnd`."""
        return [event for hook in self.plan_hooks for event in hook(rnd, pid, n)]

    def epsilon(self, history: DPHistory) -> float:
        """The epsilon of `history`. A history past the accountant's steps bound is one
        already charged (a plan or a claim past it is refused, and the ledger's stop ends
        the run before a round would take a client past it), so it is what was spent and
        must be accounted: by RDP, whose cost does not grow with the steps (PRV's grid
        would), an upper bound as valid as PRV's; the ledger's `privacy_sample` says so."""
        sample = self.plan.privacy.sample
        accountant = sample.accountant
        if steps(history) > max_steps(accountant):
            accountant = "rdp"
        return float(epsilon_of(history, sample.delta, accountant) or 0.0)

    def costliest_after(self, spent: list[Release], n: int) -> Release:
        """Of the DP-SGD releases of every example count a client of `n` may train on (a
        plugin such as pruning shrinks it, which raises q and changes sigma), the one that
        costs the most epsilon on top of `spent`."""
        options = self.releases(n)
        if len(options) == 1:
            return options[0]
        return max(options, key=lambda r: self.epsilon(after(spent, r)))

    def charged_over(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history of client `pid` (of `n` examples) charged in each of `rounds` (no
        kill) as the ledger charges a round: the costliest size given what it spent so
        far, and the hooks' releases. Cached: one accountant call per size and round, once
        a run."""
        key = (pid, n, tuple(rounds))
        cached = self._charged_cache.get(key)
        if cached is not None:
            return cached
        history = DPHistory()
        for rnd in rounds:
            history.add(*self.costliest_after(list(history.entries), n))
            for event in self.hooked(rnd, pid, n):
                history.add(*event)
        self._charged_cache[key] = history
        return history

    def every_round(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history of client `pid` (of `n` examples) trained in each of `rounds`, each
        time charged every release the plan allows it (each size a plugin may train on,
        the hooks' releases)."""
        history = DPHistory()
        for rnd in sorted(rounds):
            for event in [*self.releases(n), *self.hooked(rnd, pid, n)]:
                history.add(*event)
        return history

    def bound_histories(self, counts: Mapping[int, int],
                        rounds: Sequence[int]) -> list[DPHistory]:
        """The distinct `every_round` histories of the clients `counts` (partition id ->
        examples) over `rounds`: clients of one plan share theirs, so the released bound
        costs one accountant call per distinct plan and round, not one per client."""
        distinct = {tuple(self.every_round(pid, n, rounds).entries)
                    for pid, n in counts.items()}
        return [DPHistory(list(entries)) for entries in sorted(distinct)]


def steps(history: DPHistory) -> int:
    return sum(int(s) for _, _, s in history.entries)


def after(spent: list[Release], *events: Release) -> DPHistory:
    """`spent` and then `events`, merged as `DPHistory.add` merges them: the same entries,
    so the cached epsilon of a planned history is the one the charge looks up again (one
    accountant call per history and round, not one per use)."""
    history = DPHistory(list(spent))
    for event in events:
        history.add(*event)
    return history

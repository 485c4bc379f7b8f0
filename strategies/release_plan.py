"""What a client releases, as the server plans and charges it: a pure view of the run's
privacy plan (`fedtune.privacy.plan`) and the hooks that add to it, holding no spend.

A round's charge (`round_releases`) is every release the plan allows the client in it: the
DP-SGD release of each example count a plugin lets it train on, and the hooks' releases
(split mode's smashed data). A client trains on one count a round; charging each bounds
whichever it was, since composing one more mechanism never lowers a privacy loss. Picking
one count by its epsilon instead would not: epsilon at one delta does not order two
mechanisms, and a count that costs less now can cost more once later rounds compose
(ATTACK29G). The ledger (`strategies.privacy_ledger`) charges by it, discovery's claim
admission (`strategies.claim_admission`) checks a node's plan with it, and the released
bound under a secret cohort composes it over every round (`every_round`), so the three
count a client's releases the same way; and a plan costs one accountant composition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.accounting import max_steps
from fedtune.privacy.plan import PrivacyPlan, Release

# (round, partition id, partition size) -> further DP releases the client makes in that
# round besides its DP-SGD steps (split mode: the noised smashed data), as (sigma, q, steps).
PlanHook = Callable[[int, int, int], list[Release]]
# Example count n -> the counts a client of n may train on in a round under a plugin
# (pruning: its kept share; a plugin that changes nothing: [n]).
SizeHook = Callable[[int], list[int]]


class ReleasePlan:
    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.plan_hooks: list[PlanHook] = []
        self.size_hooks: list[SizeHook] = []

    def releases(self, n: int) -> list[Release]:
        """The DP-SGD release of each example count a client of `n` may train on: `n` as
        each plugin's hook in turn maps it."""
        sizes = {n}
        for hook in self.size_hooks:
            sizes = {m for size in sizes for m in hook(size)}
        return [self.plan.release(m) for m in sorted(sizes)]

    def round_releases(self, rnd: int, pid: int, n: int) -> list[Release]:
        """What client `pid` (of `n` examples) is charged for training in round `rnd`: the
        DP-SGD release of each example count it may train on (with sample-level DP), and
        the hooks' releases."""
        sgd = self.releases(n) if self.plan.privacy.sample.enabled else []
        return [*sgd, *(event for hook in self.plan_hooks for event in hook(rnd, pid, n))]

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

    def every_round(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history of client `pid` (of `n` examples) trained in each of `rounds`, each
        time charged `round_releases` (Python only: the accountant's answers are cached per
        history in `fedtune.privacy.accounting`)."""
        history = DPHistory()
        for rnd in sorted(rounds):
            for event in self.round_releases(rnd, pid, n):
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

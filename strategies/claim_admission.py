"""Which example counts a discovery admits into the privacy plan (sample-level DP).

A deployment node that trains on its own data file reports its example count once, at
discovery; the server plans that client's charges and the released bound from it for the
rest of the run (fixed in the server state, so a resume's discovery that hears another
count refuses that node instead of re-planning what was charged). A node's word must never
exhaust the server's memory or time, nor stop the run for everyone, so a claim is refused,
with its reason and before any unbounded accountant call, when:
- its plan over the run, interrupted attempts included, cannot be accounted
  (`check_history`'s ranges and steps bound, or the calibration's);
- it needs more than `CALIBRATIONS_PER_CLAIM` new noise calibrations;
- under a given noise multiplier, it could not train every planned round within the target
  (admitted, it would stop the run for everyone).
The partitions' own sizes are the operator's data: a plan of theirs that cannot be accounted
is a ConfigError naming the keys, and a run they outspend stops as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence

from fedtune.config import ConfigError
from fedtune.privacy import DPHistory
from fedtune.privacy.accounting import CalibrationBudgetSpent, calibration_budget, check_history
from fedtune.run.checkpoint import ServerState
from fedtune.run.epsilon_marks import Mark, reason_epsilon
from strategies.release_plan import ReleasePlan

# New noise calibrations (Opacus' search: 2-6 s each on the loaded 2-core box at 500
# steps) one node's claim may cause: one per example count it trains on (a plugin's
# `sizes_per_round`, at most 2 today). A claim that needs more is refused with its reason.
# Each partition is claimed by one node at most (the operator's roster in a deployment), so
# a discovery's calibrations are bounded by the operator's population, not by what nodes
# send: a hostile node costs the server what an honest one with its own data does. Claims
# share a calibration when their sample rate and steps agree (q = 1 / ceil(n /
# batch_size)), and the partitions' own sizes are not counted.
CALIBRATIONS_PER_CLAIM = 4


class ClaimAdmission:
    def __init__(self, releases: ReleasePlan, partition_sizes: Sequence[int],
                 state: ServerState, marks: Sequence[Mark] = ()) -> None:
        """`releases`: the plan the ledger charges by; `state`: the server state whose
        `examples` (the counts fixed so far) and `interrupted` (attempts of rounds killed
        and resumed) the admission reads and fixes; `marks`: the sample level's marks
        (`PrivacyLedger.marks`), shown beside the epsilon of a refusal."""
        self.releases = releases
        self.partition_sizes = tuple(partition_sizes)
        self.state = state
        self.marks = tuple(marks)

    def admit(self, counts: Mapping[int, int],
              claimed: Collection[int] = ()) -> dict[int, str]:
        """Fix in the server state the admitted ones of `counts` (partition id -> examples:
        the partition's size, or what a node with its own data file reported: the ids in
        `claimed`, each a claim whatever its value). Returns the refused ones, partition
        id -> reason: a count other than the one an earlier discovery of this run fixed
        (its charges and released bound were planned from that one, so it stays), or a
        claim `refusal` refuses."""
        refused: dict[int, str] = {}
        fixed = self.state.examples
        for pid, n in sorted(counts.items()):
            known = fixed.get(pid)
            if known is not None:
                if int(n) != known:
                    refused[pid] = (f"reports {int(n)} examples for partition {pid}; this run "
                                    f"fixed {known} at its first discovery (its charges and "
                                    "released bound are planned from it)")
                continue
            reason = self.refusal(pid, int(n), claim=pid in claimed)
            if reason is not None:
                refused[pid] = reason
                continue
            fixed[pid] = int(n)
        return refused

    def refusal(self, pid: int, n: int, claim: bool = True) -> str | None:
        """Why the server refuses partition `pid`'s count `n`, or None: a node's claim
        (`claim`), or the partition's own size in the server's corpus. Its plan is each
        planned round and each attempt of a round killed and resumed (`state.interrupted`,
        which the released bound counts too): refused when the server cannot account it
        (its calibration or `check_history`, run here before any accountant call: a count
        at the wire's bound plans over a million steps, which PRV cannot hold in memory),
        or under a given noise multiplier when it passes privacy.sample.target_epsilon.
        The partition's own size is the operator's: a plan of it that cannot be accounted
        raises ConfigError, one that outspends the target stops the run as before."""
        plan = self.releases.plan
        sample = plan.privacy.sample
        if not sample.enabled:
            return None
        # A node's report is a claim even when it equals the partition's size (ATTACK29G):
        # in a deployment only that report brings the corpus partition's plan in.
        own_size = (not claim and pid < len(self.partition_sizes)
                    and self.partition_sizes[pid] == n)
        planned = range(1, plan.rounds + 1)
        rounds = [*planned, *(int(a["round"]) for a in self.state.interrupted)]
        try:  # the operator's plan over the planned rounds, a claim's with the attempts too
            with contextlib.nullcontext() if own_size else calibration_budget(
                    [CALIBRATIONS_PER_CLAIM]):
                history = self.claimed_plan(pid, n, planned if own_size else rounds)
            check_history(tuple(history.entries), sample.accountant)
        except CalibrationBudgetSpent:
            return (f"claims {n} examples for partition {pid}: its DP plan needs more than "
                    f"the {CALIBRATIONS_PER_CLAIM} noise calibrations a claim may cause (each "
                    "a few seconds of the server's time)")
        except ValueError as exc:
            if own_size:
                raise ConfigError(
                    f"partition {pid}'s DP plan ({n} examples, train.rounds="
                    f"{plan.rounds}) cannot be accounted: {exc}; lower train.rounds or "
                    "train.local_steps / train.local_epochs, raise train.batch_size, or set "
                    "privacy.sample.accountant=rdp (privacy.sample.target_epsilon / "
                    "noise_multiplier set the noise)") from None
            return (f"claims {n} examples for partition {pid}: its DP plan over the run "
                    f"({len(rounds)} rounds) cannot be accounted: {exc}")
        if own_size or sample.noise_multiplier == 0:
            return None  # calibrated noise keeps every count's planned rounds at its target
        eps = self.releases.epsilon(history)
        if eps <= sample.target_epsilon:
            return None
        attempts = (f" and {len(rounds) - len(planned)} interrupted attempts"
                    if len(rounds) > len(planned) else "")
        return (f"claims {n} examples for partition {pid}: training in all "
                f"{plan.rounds} planned rounds{attempts} at "
                f"privacy.sample.noise_multiplier={sample.noise_multiplier} would spend "
                f"sample-level epsilon {reason_epsilon(eps, self.marks)}, over "
                f"privacy.sample.target_epsilon={sample.target_epsilon}")

    def claimed_plan(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history a client of `n` examples is charged over `rounds` (each trained),
        as the run charges it (`ReleasePlan.every_round`: the ledger's charge and the
        released bound alike): what the preflight counts (`planned_steps`), so a plan it
        admits is not refused here (ATTACK29F); one accountant call (ATTACK29G)."""
        return self.releases.every_round(pid, n, rounds)

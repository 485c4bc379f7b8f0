"""The server's view of privacy spend at both levels, and the budget stop.

Sample level: the server counts each client's DP-SGD spend itself, as a (sigma, q, steps)
history per client, from the same pure functions the client trains by
(`fedtune.privacy.plan.planned_release`, on the example count the server holds for it:
the partition size from `task.partitions`, or for a deployment node with its own data file
the count it reported once at discovery, `use_example_counts`: fixed in the server state
for the run, so a resume's discovery that hears another count refuses that node instead of
re-planning what was charged; a node's claim whose plan over the run, interrupted attempts
included, the server cannot account (`check_history`'s ranges and steps bound, the
calibration's) is refused before any accountant call, and under a given noise multiplier so
is one that could not train every planned round within the target, so one node's word never
exhausts the server's memory nor stops the run for everyone). A client is charged its
planned release when the round's instruction is sent, so a client that replies late,
crashes or is rejected is charged all the same (it may have trained and uploaded). The
plan covers what an honest client can release: the costliest of the example counts the
plugins allow (pruning) with the steps `train.local_steps` or `train.local_epochs` give
for it, and the hooks' releases (split mode). What a reply reports about its own spend
(`reported_dp`) is kept in the ledger as the client's word and never accounted: a forged
history can neither lower the charge nor make the server's accountant fail or stall
(issue 27). `epsilon_sample` is the largest epsilon over the server-side histories.
With user-level DP too (cohorts kept apart: `fedtune.run.curator_log`) the cohort is a
secret draw, and that maximum says who was drawn (it grows only in rounds the worst client
was sampled): the release gets instead the epsilon of a client sampled in every round so
far, every attempt included, at the costliest plan (`cohort_free_bound`), which no real
client's epsilon exceeds; the real ones stay in the curator's log (`epsilon_by_client`),
and a budget stop's release names no client (`Stop`).

User level: one Poisson-subsampled Gaussian release per round (`fedtune.privacy.user_level`).
Before a round starts, `stop_reason` says whether it could push either level past its budget,
in every noise mode (calibrated noise is within its target only while no round was lost).
A round that would take a history past privacy.sample.accountant's steps bound is a budget
stop too (a run planned at the bound and killed once gets there); a history already charged
past it is accounted by RDP (an upper bound as well; `privacy_sample` says so), never refused.

Kills: the charges of a round are written to `privacy_pending.json` before it is sent. If
the run dies in that round, a resume charges them (every attempt, if it died in that round
more than once): the lost one's uploads may have been seen, and the replayed round is
charged again when it is sent. This holds in every noise mode. With
`privacy.reproducible_noise` a replay that re-sends a client the identical instruction
redraws the same noise, so charging it twice over-counts; but a replay's cohort can differ
(another roster at discovery draws another seeded sample), and a client of the lost
attempt that the replay leaves out released once all the same. Over-charging a seeded
replay is the safe side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from fedtune.config import ConfigError
from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.accounting import (
    PRV_MAX_POINTS,
    CalibrationBudgetSpent,
    calibration_budget,
    check_history,
    grouped,
    max_steps,
    past_cost_bound,
)
from fedtune.privacy.plan import PrivacyPlan, Release
from fedtune.privacy.randomness import noise_note
from fedtune.privacy.user_level import UserLevelAccount, calibrate_user_noise
from fedtune.run.checkpoint import ServerState, load_pending, save_pending

# (round, partition id, partition size) -> further DP releases the client makes in that
# round besides its DP-SGD steps (split mode: the noised smashed data), as (sigma, q, steps).
PlanHook = Callable[[int, int, int], list[Release]]

BOUND_NOTE = ("the epsilon of a client sampled in every round so far (every attempt of a "
              "round killed and resumed included) at the costliest release the plan allows "
              "each round: no client's epsilon is larger, whoever the secret cohorts held; "
              "each client's own is in the curator's log")


# New noise calibrations (Opacus' search: 2-6 s each on the loaded 2-core box at 500
# steps) one node's claim may cause: one per example count it trains on (a plugin's
# `sizes_per_round`, at most 2 today). A claim that needs more is refused with its reason.
# Each partition is claimed by one node at most (the operator's roster in a deployment), so
# a discovery's calibrations are bounded by the operator's population, not by what nodes
# send: a hostile node costs the server what an honest one with its own data does. Claims
# share a calibration when their sample rate and steps agree (q = 1 / ceil(n /
# batch_size)), and the partitions' own sizes are not counted.
CALIBRATIONS_PER_CLAIM = 4


class Stop(NamedTuple):
    """Why a round must not run: `release` for summary.json, `curator` for the curator's
    log (the same text unless it names a client of a secret cohort)."""

    release: str
    curator: str


PAST_BOUND_NOTE = ("a history charged past the {0} accountant's steps bound (the attempts of "
                   "rounds killed and resumed) is accounted by RDP, an upper bound too")
PAST_COST_NOTE = (f"a history whose PRV grid would pass {PRV_MAX_POINTS:,} points (noise low "
                  "enough for an epsilon in the tens or hundreds: PRV's time and memory grow "
                  "with it) is accounted by RDP, an upper bound too and larger there")
SAMPLE_RATE_NOTE = ("q = 1 / ceil(n / batch_size) per client: the rate of Opacus' Poisson "
                    "loader (at most batch_size / n)")


class PrivacyLedger:
    def __init__(self, plan: PrivacyPlan, partition_sizes: Sequence[int], state: ServerState,
                 folder: Path | None = None) -> None:
        """`plan`: the run's privacy settings and schedule; `partition_sizes`: the examples
        of each partition (simulation), what a client is planned on unless a deployment node
        reported its own count (`use_example_counts`). `folder` (the run folder) makes each
        round's charges durable before it is sent and charges, on a resume, a round that was
        sent but never completed."""
        self.plan = plan
        self.privacy = plan.privacy
        self.partition_sizes = tuple(int(n) for n in partition_sizes)
        self.state = state
        self.folder = folder
        self.plan_hooks: list[PlanHook] = []
        # Example counts a client of n may train on (plugins: pruning), n -> counts.
        self.size_hooks: list[Callable[[int], list[int]]] = []
        self._before: dict[int, DPHistory] = {}
        self._as_charged_cache: dict[tuple[int, int, tuple[int, ...]], DPHistory] = {}
        self._sent_round = 0
        user = plan.privacy.user
        # As `fedtune.run.curator_log.keeps_cohorts_apart` (which reads a whole config):
        # under user-level DP who was sampled is the curator's, unless the run logs cohorts.
        self.cohort_secret = user.enabled and not user.log_cohorts
        self.user: UserLevelAccount | None = None
        if user.enabled:
            cohort, population = plan.cohort, plan.population
            sigma = user.noise_multiplier or calibrate_user_noise(
                user.target_epsilon, user.delta, cohort, population, plan.rounds)
            self.user = UserLevelAccount(sigma, cohort, population, user.delta,
                                         releases=state.user_releases)
        if folder is not None:
            self._charge_interrupted(load_pending(folder))
        if state.examples:  # a resume: the counts fixed at the run's discoveries
            self._example_counts = MappingProxyType(state.examples)

    # -- what a round costs

    # Partition id -> examples, for the nodes that train on their own data file (a
    # deployment): the count each reported at discovery. Others train on their partition.
    _example_counts: Mapping[int, int] = MappingProxyType({})

    def use_example_counts(self, counts: Mapping[int, int]) -> dict[int, str]:
        """Admit the counts a discovery bound (partition id -> examples: the partition's
        size, or what a node with its own data file reported: `DeltaFedAvg.examples`) and
        plan every charge and the released bound from the admitted ones, fixed in the server
        state (the checkpoint) for the rest of the run. Returns the refused ones, partition
        id -> reason; the caller takes those nodes out of the run:
        - a count other than the one an earlier discovery of this run fixed (a resume): the
          charges so far and the released bound were planned from that one, so it stays;
        - a node's claim (a count other than its partition's size) whose plan over the run
          the server cannot account (`_claim_refusal`: the calibration or the accountant's
          ranges, its steps among them), or, under a given noise multiplier, whose plan
          passes privacy.sample.target_epsilon: it could never train the run within budget,
          and admitted it would stop the run for everyone (under a secret cohort the stop
          follows the worst admitted count). The partitions' own sizes are the operator's
          data: a plan of theirs that cannot be accounted is a ConfigError naming the keys;
          a run they outspend stops as before;
        - a node's claim whose plan needs more than `CALIBRATIONS_PER_CLAIM` new noise
          calibrations (each is Opacus' search, seconds of the server's time; a sample rate
          calibrated before costs none)."""
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
            reason = self._claim_refusal(pid, int(n))
            if reason is not None:
                refused[pid] = reason
                continue
            fixed[pid] = int(n)
        self._example_counts = MappingProxyType(fixed)
        return refused

    def _claim_refusal(self, pid: int, n: int) -> str | None:
        """Why the server refuses a node's claim of `n` examples, or None. Its plan is each
        planned round and each attempt of a round killed and resumed (`state.interrupted`,
        which the released bound counts too): refused when the server cannot account it
        (its calibration or `check_history`, run here before any accountant call: a count
        at the wire's bound plans over a million steps, which PRV cannot hold in memory),
        or under a given noise multiplier when it passes privacy.sample.target_epsilon.
        The partition's own size is the operator's: a plan of it that cannot be accounted
        raises ConfigError, one that outspends the target stops the run as before."""
        sample = self.privacy.sample
        if not sample.enabled:
            return None
        own_size = pid < len(self.partition_sizes) and self.partition_sizes[pid] == n
        planned = range(1, self.plan.rounds + 1)
        rounds = [*planned, *(int(a["round"]) for a in self.state.interrupted)]
        try:  # the operator's plan over the planned rounds, a claim's with the attempts too
            with contextlib.nullcontext() if own_size else calibration_budget(
                    [CALIBRATIONS_PER_CLAIM]):
                history = self._claimed_plan(pid, n, planned if own_size else rounds)
            check_history(tuple(history.entries), sample.accountant)
        except CalibrationBudgetSpent:
            return (f"claims {n} examples for partition {pid}: its DP plan needs more than "
                    f"the {CALIBRATIONS_PER_CLAIM} noise calibrations a claim may cause (each "
                    "a few seconds of the server's time)")
        except ValueError as exc:
            if own_size:
                raise ConfigError(
                    f"partition {pid}'s DP plan ({n} examples, train.rounds="
                    f"{self.plan.rounds}) cannot be accounted: {exc}; lower train.rounds or "
                    "train.local_steps / train.local_epochs, raise train.batch_size, or set "
                    "privacy.sample.accountant=rdp (privacy.sample.target_epsilon / "
                    "noise_multiplier set the noise)") from None
            return (f"claims {n} examples for partition {pid}: its DP plan over the run "
                    f"({len(rounds)} rounds) cannot be accounted: {exc}")
        if own_size or sample.noise_multiplier == 0:
            return None  # calibrated noise keeps every count's planned rounds at its target
        eps = self._epsilon(history)
        if eps <= sample.target_epsilon:
            return None
        attempts = (f" and {len(rounds) - len(planned)} interrupted attempts"
                    if len(rounds) > len(planned) else "")
        return (f"claims {n} examples for partition {pid}: training in all "
                f"{self.plan.rounds} planned rounds{attempts} at "
                f"privacy.sample.noise_multiplier={sample.noise_multiplier} would spend "
                f"sample-level epsilon {eps:.4f}, over privacy.sample.target_epsilon="
                f"{sample.target_epsilon}")

    def _claimed_plan(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history a client of `n` examples is charged over `rounds` (each trained),
        as the run charges it: with a secret cohort the released bound's (every size every
        round), else `planned`'s (the costliest size each round): what the preflight counts
        (`planned_steps`), so a plan it admits is not refused here (ATTACK29F)."""
        if self.cohort_secret:
            return self._every_round(pid, n, rounds)
        return self._charged_over(pid, n, sorted(rounds))

    def _every_round(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """The history of client `pid` (of `n` examples) trained in each of `rounds`, each
        time charged every release the plan allows it (each size a plugin may train on,
        the hooks' releases)."""
        history = DPHistory()
        for rnd in sorted(rounds):
            for event in [*self._releases(n),
                          *(e for hook in self.plan_hooks for e in hook(rnd, pid, n))]:
                history.add(*event)
        return history

    def example_count(self, pid: int) -> int:
        """The examples the server plans client `pid`'s DP-SGD over."""
        known = self._example_counts.get(pid)
        return known if known is not None else self.partition_sizes[pid]

    def planned(self, rnd: int, pid: int) -> list[Release]:
        """What client `pid` releases if it trains in round `rnd`, as the server plans it:
        DP-SGD over the examples it holds (`example_count`; at the costliest size a plugin
        allows) and the hooks' releases."""
        n = self.example_count(pid)
        events = [self._costliest(pid, n)] if self.privacy.sample.enabled else []
        for hook in self.plan_hooks:
            events.extend(hook(rnd, pid, n))
        return events

    def _costliest(self, pid: int, n: int) -> Release:
        """The planned DP-SGD release over every example count the client may train on
        (a plugin such as pruning shrinks it, which raises q and changes sigma) that costs
        the client the most epsilon on top of what it has spent."""
        return self._costliest_after(self.state.client_dp.get(pid, DPHistory()).entries, n)

    def _costliest_after(self, spent: list[Release], n: int) -> Release:
        """`_costliest` for a client of `n` examples that has spent `spent`."""
        releases = self._releases(n)
        if len(releases) == 1:
            return releases[0]
        return max(releases, key=lambda r: self._epsilon(_after(spent, r)))

    def _releases(self, n: int) -> list[Release]:
        """The DP-SGD release of each example count a client of `n` may train on."""
        sizes = sorted({n, *(m for hook in self.size_hooks for m in hook(n))})
        return [self.plan.release(m) for m in sizes]

    def _epsilon(self, history: DPHistory) -> float:
        """The epsilon of `history`. A history past the accountant's steps bound is one
        already charged (a plan or a claim past it is refused, and `stop` ends the run before
        a round would take a client past it), so it is what was spent and must be accounted:
        by RDP, whose cost does not grow with the steps (PRV's grid would), an upper bound as
        valid as PRV's; `_sample_params` says so."""
        sample = self.privacy.sample
        accountant = sample.accountant
        if _steps(history) > max_steps(accountant):
            accountant = "rdp"
        return float(epsilon_of(history, sample.delta, accountant) or 0.0)

    def _charge(self, pid: int, events: list[Release]) -> None:
        history = self.state.client_dp.setdefault(pid, DPHistory())
        for event in events:
            history.add(*event)
        self._set_epsilon(pid)

    def _set_epsilon(self, pid: int) -> None:
        eps = self._epsilon(self.state.client_dp[pid])
        self.state.client_eps[pid] = max(self.state.client_eps.get(pid, 0.0), eps)

    # -- before a round

    def stop_reason(self, rnd: int, cohort: list[int]) -> str | None:
        """Why round `rnd` must not run (its spend could exceed a budget), or None: the
        curator's text (`stop` gives the release's too)."""
        stop = self.stop(rnd, cohort)
        return stop.curator if stop is not None else None

    def stop(self, rnd: int, cohort: list[int]) -> Stop | None:
        """Why round `rnd` must not run (its spend could exceed a budget), or None."""
        user = self.privacy.user
        if self.user is not None:
            after = self.user.epsilon(self.user.releases + 1)
            if after is not None and after > user.target_epsilon:
                reason = (f"round {rnd} would raise the user-level epsilon to {after:.4f}, "
                          f"over privacy.user.target_epsilon={user.target_epsilon}")
                return Stop(reason, reason)  # one release for every client: no cohort in it
        sample = self.privacy.sample
        if not sample.enabled:
            return None
        # In every noise mode: calibrated noise keeps a client that trains in every planned
        # round within its target, but a round killed and resumed is charged once more
        # (`_charge_interrupted`), which can take it past.
        past = self._past_steps_bound(rnd, cohort)
        if past is not None:
            return Stop(past, past)
        if self.cohort_secret:
            # Which clients would run out depends on who was sampled; the released bound
            # does not, so the stop follows it: the run ends at the same round whoever the
            # secret cohorts were, and the released epsilon never passes the budget.
            after = self.cohort_free_bound(through=rnd)
            budget, what = self._budget(self._admitted())
            if after is not None and after > budget:
                reason = (f"round {rnd} would raise the released sample-level bound (a "
                          f"client sampled in every round) to {after:.4f}, over {what}")
                return Stop(reason, reason)
            return None
        for pid in cohort:
            spent = self.state.client_dp.get(pid, DPHistory()).entries
            after = self._epsilon(_after(spent, *self.planned(rnd, pid)))
            budget, what = self._budget([pid])
            if after > budget:
                named = (f"round {rnd} would raise client {pid}'s sample-level epsilon "
                         f"to {after:.4f}, over {what}")
                return Stop(named, named)
        return None

    def _past_steps_bound(self, rnd: int, cohort: list[int]) -> str | None:
        """Why round `rnd` would take a history past privacy.sample.accountant's steps bound
        (`check_history`), or None: a budget stop like any other (a run at the bound killed
        and resumed is charged the lost attempt too). Under a secret cohort, the released
        bound's history (a client sampled in every round); else each client of `cohort`."""
        accountant = self.privacy.sample.accountant
        if self.cohort_secret:  # no accountant call: the longest of the bound's histories
            histories = {"the released sample-level bound (a client sampled in every round)":
                         self._longest_bound_history(self._bound_rounds(rnd))}
        else:
            histories = {f"client {pid}'s sample-level history": _after(
                self.state.client_dp.get(pid, DPHistory()).entries, *self.planned(rnd, pid))
                for pid in cohort}
        for what, history in histories.items():
            try:
                check_history(tuple(history.entries), accountant)
            except ValueError as exc:
                return (f"round {rnd} would take {what} past what the {accountant} "
                        f"accountant accounts ({exc}; rounds killed and resumed are "
                        "charged too): the budget this run can account is spent")
        return None

    def _longest_bound_history(self, rounds: Sequence[int]) -> DPHistory:
        """The longest (in steps) of the released bound's histories over `rounds`."""
        return max((self._every_round(pid, self.example_count(pid), rounds)
                    for pid in self._admitted()), key=_steps)

    def _budget(self, pids: Sequence[int]) -> tuple[float, str]:
        """The sample-level epsilon no round may pass for clients `pids`, and its name:
        privacy.sample.target_epsilon; under calibrated noise, where larger, what the plan
        itself spends on one of them trained in every planned round (split mode's smashed
        releases, calibrated to their own target, and pruning's sizes, each calibrated
        apart, add to the calibrated DP-SGD's): only a killed round's charge passes that.
        The plan as charged: with a secret cohort, what the released bound (every size
        every round) is after the planned rounds; else the costliest size each round, as
        `planned` charges a client (every size every round passes that: ATTACK29E)."""
        sample = self.privacy.sample
        target = (sample.target_epsilon, f"privacy.sample.target_epsilon={sample.target_epsilon}")
        if sample.noise_multiplier > 0:
            return target
        planned_rounds = range(1, self.plan.rounds + 1)
        if self.cohort_secret:
            planned = self._worst_every_round(pids, planned_rounds)
        else:
            planned = max(self._epsilon(self._as_charged(pid, planned_rounds)) for pid in pids)
        if planned <= sample.target_epsilon:
            return target
        return planned, (f"the {planned:.4f} the calibrated plan spends over its "
                         f"{self.plan.rounds} rounds (privacy.sample.target_epsilon="
                         f"{sample.target_epsilon} and the releases calibrated apart)")

    def _as_charged(self, pid: int, rounds: Sequence[int]) -> DPHistory:
        """The history of client `pid` charged in each of `rounds` (no kill) as `planned`
        charges it: the costliest size given what it spent so far, and the hooks' releases.
        Cached per client: one accountant call per size and round, once a run."""
        return self._charged_over(pid, self.example_count(pid), rounds)

    def _charged_over(self, pid: int, n: int, rounds: Sequence[int]) -> DPHistory:
        """`_as_charged` for a client of `n` examples."""
        key = (pid, n, tuple(rounds))
        cached = self._as_charged_cache.get(key)
        if cached is not None:
            return cached
        history = DPHistory()
        for rnd in rounds:
            history.add(*self._costliest_after(list(history.entries), n))
            for hook in self.plan_hooks:
                for event in hook(rnd, pid, n):
                    history.add(*event)
        self._as_charged_cache[key] = history
        return history

    def charge_sent(self, rnd: int, partition_ids: list[int]) -> None:
        """Charge every client asked to train in round `rnd` its planned release. Call it
        after the messages are built (they carry each client's history before this charge)
        and before they go out: the charges are on disk first."""
        charges = {pid: self.planned(rnd, pid) for pid in partition_ids}
        charges = {pid: events for pid, events in charges.items() if events}
        self._sent_round = max(self._sent_round, rnd)
        # With a secret cohort an empty attempt is on record too: the attempts a resume
        # counts into the released bound must not say whether a cohort was empty.
        if self.folder is not None and (charges or self.cohort_secret):
            # Earlier attempts at this round that never completed (runs killed in it) stay
            # on record until the round completes: each was a release of its own.
            pending = load_pending(self.folder)
            attempts = pending["attempts"] if pending and pending["round"] == rnd else []
            attempts.append({str(pid): [list(e) for e in events]
                             for pid, events in charges.items()})
            # With the counts they were planned from: a resume of a run killed before its
            # first checkpoint after discovery keeps them.
            save_pending(self.folder, {"round": rnd, "attempts": attempts,
                                       "examples": {str(pid): n for pid, n
                                                    in self.state.examples.items()}})
        self._before = {pid: DPHistory(list(self.state.client_dp.get(pid, DPHistory()).entries))
                        for pid in charges}
        for pid, events in charges.items():
            self._charge(pid, events)

    # -- after a round

    def settle(self, rnd: int) -> None:
        """Close round `rnd` and record its user-level release. Sample-level spend was
        charged in full when the round was sent (`charge_sent`); the replies (accepted,
        rejected and failed alike) change nothing in it, so settling takes none of them: a
        `reported_dp` is the client's word, kept in its ledger entry and never run through
        the accountant, so settling costs no accountant call whatever a reply holds."""
        del rnd  # the charge is the server's plan, made before the round was sent
        self._before = {}
        if self.user is not None:
            self.user.record()
            self.state.user_releases = self.user.releases

    def _charge_interrupted(self, pending: dict[str, Any] | None) -> None:
        """On a resume: charge every attempt at the round that was sent but never completed,
        in every noise mode (see the module docstring: a seeded replay may leave out a
        client the lost attempt asked, so it is over-charged rather than under-charged)."""
        if pending is None or int(pending["round"]) != self.state.round + 1:
            return  # none recorded, or that round completed and is in the checkpoint
        for pid, n in pending.get("examples", {}).items():
            self.state.examples.setdefault(int(pid), int(n))
        for attempt in pending["attempts"]:
            charges = {int(pid): [tuple(e) for e in events] for pid, events in attempt.items()}
            for pid, events in charges.items():
                self._charge(pid, events)
            self.state.interrupted.append({"round": int(pending["round"]),
                                           "partition_ids": sorted(charges)})

    def fields(self) -> dict[str, Any]:
        """Both epsilons, the parameters that reproduce them, and what the noise is secret
        from, for the ledger."""
        sample, user = self.privacy.sample, self.privacy.user
        if self.cohort_secret:
            eps_sample = self.cohort_free_bound()
        else:
            eps_sample = max(self.state.client_eps.values()) if self.state.client_eps else None
        return {
            "epsilon_sample": eps_sample if sample.enabled else None,
            "epsilon_user": self.user.epsilon() if self.user is not None else None,
            "delta": sample.delta if sample.enabled else (user.delta if user.enabled else None),
            "noise": (noise_note(self.privacy.reproducible_noise)
                      if sample.enabled or user.enabled else None),
            "privacy_sample": self._sample_params() if sample.enabled else None,
            "privacy_user": self._user_params() if self.user is not None else None,
        }

    def spent(self) -> dict[str, Any]:
        """The released fields as they stand (`fields`), for the summary: both epsilons and
        the privacy sections that reproduce them, every charge made so far included (an
        interrupted attempt's on a resume too, which the last round's record may predate)."""
        return self.fields()

    def cohort_free_bound(self, through: int | None = None) -> float | None:
        """The epsilon of a client sampled in every round sent so far (and in round
        `through`, when given: what sending it would release), and in every
        attempt of a round killed and resumed, charged each time every release the plan
        allows it (each size a plugin may train on, the hooks' releases): the worst over
        the admitted population's example counts. A real client's history is part of that
        one, so its epsilon is never larger; and nothing in it depends on who was sampled. None
        before any round was sent."""
        if not self.privacy.sample.enabled:
            return None
        rounds = self._bound_rounds(through)
        if not rounds:
            return None
        bound = self._worst_every_round(self._admitted(), rounds)
        charged = max(self.state.client_eps.values(), default=0.0)
        if bound < charged:  # cannot happen: every charge is a part of the bound's history
            raise RuntimeError(f"the released sample-level bound {bound} is below a "
                               f"client's charged epsilon {charged}: a ledger bug")
        return bound

    def _bound_rounds(self, through: int | None = None) -> list[int]:
        """The rounds `cohort_free_bound` charges: each sent so far (and `through`), and
        each attempt of a round killed and resumed."""
        last = max(self.state.round, self._sent_round, through or 0)
        rounds = list(range(1, last + 1))
        return rounds + [int(attempt["round"]) for attempt in self.state.interrupted]

    def _admitted(self) -> list[int]:
        """The admitted population once a discovery fixed its counts (a refused claim is
        never sent an instruction), else every partition."""
        return sorted(self._example_counts) or list(range(len(self.partition_sizes)))

    def _worst_every_round(self, pids: Sequence[int], rounds: Sequence[int]) -> float:
        """The largest epsilon of a client of `pids` trained in each of `rounds` at the
        costliest plan (`_every_round`)."""
        histories = {tuple(self._every_round(pid, self.example_count(pid), rounds).entries)
                     for pid in pids}
        # One accountant call per distinct plan and round (clients of one size share
        # theirs): with PRV ~0.2-0.4 s each on a loaded 2-core box, so a population of
        # many distinct partition sizes pays that many calls a round (the cohort's own
        # charges pay one per sampled client).
        return max(self._epsilon(DPHistory(list(h))) for h in histories)

    def _sample_params(self) -> dict[str, Any]:
        dp = self.privacy.sample
        bound = {"epsilon_sample_bounds": BOUND_NOTE} if self.cohort_secret else {}
        return {
            **bound,
            "accountant": dp.accountant,
            "delta": dp.delta,
            "max_grad_norm": dp.max_grad_norm,
            "target_epsilon": dp.target_epsilon,
            "noise_multiplier": dp.noise_multiplier or "calibrated per client (see histories)",
            "planned_rounds": self.plan.rounds,
            "sample_rate": SAMPLE_RATE_NOTE,
            "grad_sample_mode": dp.grad_sample_mode,
            # The server's own count per client: epsilon_sample is the largest epsilon of
            # these at `delta`, recomputable with any accountant.
            "histories": {str(pid): h.to_lists()
                          for pid, h in sorted(self.state.client_dp.items())},
            "epsilon_by_client": {str(pid): e
                                  for pid, e in sorted(self.state.client_eps.items())},
            "interrupted_rounds_charged": self.state.interrupted,
            **({"accountant_past_steps_bound": PAST_BOUND_NOTE.format(dp.accountant)}
               if self._past_steps_bound_charged() else {}),
            **({"accountant_past_cost_bound": PAST_COST_NOTE}
               if self._past_cost_bound_charged() else {}),
        }

    def _past_steps_bound_charged(self) -> bool:
        """Whether a released epsilon comes from a history past the accountant's steps
        bound (accounted by RDP, `_epsilon`)."""
        most = max_steps(self.privacy.sample.accountant)
        if self.cohort_secret:
            rounds = self._bound_rounds()
            return bool(rounds) and _steps(self._longest_bound_history(rounds)) > most
        return any(_steps(h) > most for h in self.state.client_dp.values())

    def _past_cost_bound_charged(self) -> bool:
        """Whether a released epsilon comes from a history within the steps bound whose PRV
        grid passes `PRV_MAX_POINTS` (accounted by RDP in `epsilon_of`)."""
        sample = self.privacy.sample
        if sample.accountant != "prv":
            return False
        if self.cohort_secret:
            rounds = self._bound_rounds()
            histories = [self._every_round(pid, self.example_count(pid), rounds)
                         for pid in self._admitted()] if rounds else []
        else:
            histories = list(self.state.client_dp.values())
        return any(_steps(h) <= max_steps("prv")
                   and past_cost_bound(grouped(tuple(h.entries)), sample.delta)
                   for h in histories)

    def _user_params(self) -> dict[str, Any]:
        assert self.user is not None
        user = self.privacy.user
        return {**self.user.params(), "clipping": user.clipping, "clip_norm": user.clip_norm,
                "target_epsilon": user.target_epsilon,
                "noise_std": self.user.noise_multiplier * user.clip_norm / self.user.cohort}


def _steps(history: DPHistory) -> int:
    return sum(int(steps) for _, _, steps in history.entries)


def _after(spent: list[Release], *events: Release) -> DPHistory:
    """`spent` and then `events`, merged as `DPHistory.add` merges them: the same entries,
    so the cached epsilon of a planned history is the one the charge looks up again (one
    accountant call per history and round, not one per use)."""
    history = DPHistory(list(spent))
    for event in events:
        history.add(*event)
    return history

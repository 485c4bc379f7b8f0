"""The server's view of privacy spend at both levels, and the budget stop.

Sample level: the server counts each client's DP-SGD spend itself, as a (sigma, q, steps)
history per client, from the same pure functions the client trains by
(`fedtune.privacy.plan.planned_release`, on the example count the server holds for it: the
partition size from `task.partitions`, or for a deployment node with its own data file the
count it reported once at discovery, admitted or refused by `strategies.claim_admission`
and fixed in the server state for the run). What a client releases is
`strategies.release_plan`'s, shared with that admission and with the released bound. A
client is charged its planned release when the round's instruction is sent, so a client
that replies late, crashes or is rejected is charged all the same (it may have trained and
uploaded). The charge covers what an honest client can release: each example count the
plugins allow (pruning's kept share) with the steps `train.local_steps` or
`train.local_epochs` give for it, and the hooks' releases (split mode). What a reply
reports about its own spend (`reported_dp`) is kept in the ledger as the client's word and
never accounted: a forged history can neither lower the charge nor make the server's
accountant fail or stall (issue 27). `epsilon_sample` is the largest epsilon over the
server-side histories. With user-level DP too (cohorts kept apart:
`fedtune.run.curator_log`) the cohort is a secret draw, and that maximum says who was
drawn (it grows only in rounds the worst client was sampled): the release gets instead the
epsilon of a client sampled in every round so far, every attempt included
(`cohort_free_bound`), which no real client's epsilon exceeds; the real
ones stay in the curator's log (`epsilon_by_client`), and a budget stop's release names no
client (`Stop`).

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

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from fedtune.privacy import DPHistory
from fedtune.privacy.accounting import (
    PRV_MAX_POINTS,
    check_history,
    grouped,
    max_steps,
    past_cost_bound,
)
from fedtune.privacy.plan import PrivacyPlan, Release
from fedtune.privacy.randomness import noise_note
from fedtune.privacy.user_level import UserLevelAccount, calibrate_user_noise
from fedtune.run.checkpoint import ServerState, load_pending, save_pending
from fedtune.run.epsilon_marks import LEVELS, Mark, reason_epsilon
from strategies.claim_admission import ClaimAdmission
from strategies.release_plan import ReleasePlan, after, steps

BOUND_NOTE = ("the epsilon of a client sampled in every round so far (every attempt of a "
              "round killed and resumed included), charged every release the plan allows "
              "each round: no client's epsilon is larger, whoever the secret cohorts held; "
              "each client's own is in the curator's log")



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
                 folder: Path | None = None,
                 marks: Mapping[str, Sequence[Mark]] | None = None) -> None:
        """`plan`: the run's privacy settings and schedule; `partition_sizes`: the examples
        of each partition (simulation), what a client is planned on unless a deployment node
        reported its own count (`use_example_counts`). `folder` (the run folder) makes each
        round's charges durable before it is sent and charges, on a resume, a round that was
        sent but never completed. `marks`: the run's marks by level
        (`fedtune.run.epsilon_marks.run_marks`, as the server passes them), shown beside
        each epsilon of a budget stop's or a refused claim's reason; none if not given (a
        ledger tested on its accounting alone)."""
        self.plan = plan
        self.marks = {level: tuple((marks or {}).get(level, ())) for level in LEVELS}
        self.privacy = plan.privacy
        self.partition_sizes = tuple(int(n) for n in partition_sizes)
        self.state = state
        self.folder = folder
        # What a client releases (hooks: split mode's smashed data, pruning's sizes).
        self.releases = ReleasePlan(plan)
        self._before: dict[int, DPHistory] = {}
        self._sent_round = 0
        user = plan.privacy.user
        # As `fedtune.run.curator_log.keeps_cohorts_apart` (which reads a whole config):
        # under user-level DP who was sampled is the curator's, unless the run logs cohorts.
        self.cohort_secret = user.enabled and not user.log_cohorts
        self.claims = ClaimAdmission(self.releases, self.partition_sizes, state,
                                     marks=self.marks["sample"])
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

    def use_example_counts(self, counts: Mapping[int, int],
                           claimed: Collection[int] = ()) -> dict[int, str]:
        """Admit the counts a discovery bound (partition id -> examples: the partition's
        size, or what a node with its own data file reported, the ids in `claimed`:
        `DeltaFedAvg.examples` and `.claimed`) and plan every charge and the released bound
        from the admitted ones, fixed in the server state (the checkpoint) for the rest of
        the run. Returns the refused ones, partition id -> reason (`ClaimAdmission.admit`);
        the caller takes those nodes out of the run."""
        refused = self.claims.admit(counts, claimed)
        self._example_counts = MappingProxyType(self.state.examples)
        return refused

    def example_count(self, pid: int) -> int:
        """The examples the server plans client `pid`'s DP-SGD over."""
        known = self._example_counts.get(pid)
        return known if known is not None else self.partition_sizes[pid]

    def planned(self, rnd: int, pid: int) -> list[Release]:
        """What client `pid` is charged if it trains in round `rnd`, as the server plans it
        (`ReleasePlan.round_releases`): DP-SGD over each example count it may train on
        (`example_count`, and a plugin's shares of it) and the hooks' releases."""
        return self.releases.round_releases(rnd, pid, self.example_count(pid))

    def _charge(self, pid: int, events: list[Release]) -> None:
        history = self.state.client_dp.setdefault(pid, DPHistory())
        for event in events:
            history.add(*event)
        self._set_epsilon(pid)

    def _set_epsilon(self, pid: int) -> None:
        eps = self.releases.epsilon(self.state.client_dp[pid])
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
            user_eps = self.user.epsilon(self.user.releases + 1)
            if user_eps is not None and user_eps > user.target_epsilon:
                reason = (f"round {rnd} would raise the user-level epsilon to "
                          f"{self._shown('user', user_eps)}, over "
                          f"privacy.user.target_epsilon={user.target_epsilon}")
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
            bound = self.cohort_free_bound(through=rnd)
            budget, what = self._budget(self._admitted())
            if bound is not None and bound > budget:
                reason = (f"round {rnd} would raise the released sample-level bound (a "
                          f"client sampled in every round) to "
                          f"{self._shown('sample', bound)}, over {what}")
                return Stop(reason, reason)
            return None
        for pid in cohort:
            spent = self.state.client_dp.get(pid, DPHistory()).entries
            after_round = self.releases.epsilon(after(spent, *self.planned(rnd, pid)))
            budget, what = self._budget([pid])
            if after_round > budget:
                named = (f"round {rnd} would raise client {pid}'s sample-level epsilon "
                         f"to {self._shown('sample', after_round)}, over {what}")
                return Stop(named, named)
        return None

    def _shown(self, level: str, epsilon: float) -> str:
        """An epsilon of `level` as a reason shows it: with the run's marks."""
        return reason_epsilon(epsilon, self.marks[level])

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
            histories = {f"client {pid}'s sample-level history": after(
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
        return max(self._bound_histories(rounds), key=steps)

    def _budget(self, pids: Sequence[int]) -> tuple[float, str]:
        """The sample-level epsilon no round may pass for clients `pids`, and its name:
        privacy.sample.target_epsilon; under calibrated noise, where larger, what the plan
        itself spends on one of them trained in every planned round (split mode's smashed
        releases, calibrated to their own target, and pruning's sizes, each calibrated
        apart, add to the calibrated DP-SGD's): only a killed round's charge passes that.
        The plan as charged: every release `planned` allows, in every planned round."""
        sample = self.privacy.sample
        target = (sample.target_epsilon, f"privacy.sample.target_epsilon={sample.target_epsilon}")
        if sample.noise_multiplier > 0:
            return target
        planned = self._worst_every_round(pids, range(1, self.plan.rounds + 1))
        if planned <= sample.target_epsilon:
            return target
        return planned, (f"the {self._shown('sample', planned)} the calibrated plan spends "
                         f"over its {self.plan.rounds} rounds (privacy.sample.target_epsilon="
                         f"{sample.target_epsilon} and the releases calibrated apart)")

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
        """The largest epsilon of a client of `pids` trained in each of `rounds`, charged
        every release the plan allows (`ReleasePlan.every_round`). One accountant call per
        distinct plan and round (with PRV ~0.2-0.4 s each on a loaded 2-core box, so a
        population of many distinct partition sizes pays that many calls a round)."""
        counts = {pid: self.example_count(pid) for pid in pids}
        return max(self.releases.epsilon(h)
                   for h in self.releases.bound_histories(counts, rounds))

    def _bound_histories(self, rounds: Sequence[int]) -> list[DPHistory]:
        """The released bound's distinct histories over `rounds`, one per admitted plan."""
        return self.releases.bound_histories(
            {pid: self.example_count(pid) for pid in self._admitted()}, rounds)

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
            return bool(rounds) and steps(self._longest_bound_history(rounds)) > most
        return any(steps(h) > most for h in self.state.client_dp.values())

    def _past_cost_bound_charged(self) -> bool:
        """Whether a released epsilon comes from a history within the steps bound whose PRV
        grid passes `PRV_MAX_POINTS` (accounted by RDP in `epsilon_of`)."""
        sample = self.privacy.sample
        if sample.accountant != "prv":
            return False
        if self.cohort_secret:
            rounds = self._bound_rounds()
            histories = self._bound_histories(rounds) if rounds else []
        else:
            histories = list(self.state.client_dp.values())
        return any(steps(h) <= max_steps("prv")
                   and past_cost_bound(grouped(tuple(h.entries)), sample.delta)
                   for h in histories)

    def _user_params(self) -> dict[str, Any]:
        assert self.user is not None
        user = self.privacy.user
        return {**self.user.params(), "clipping": user.clipping, "clip_norm": user.clip_norm,
                "target_epsilon": user.target_epsilon,
                "noise_std": self.user.noise_multiplier * user.clip_norm / self.user.cohort}


"""The server's view of privacy spend at both levels, and the budget stop.

Sample level: each client runs DP-SGD and reports its epsilon; the server keeps the
maximum per client and each client's (sigma, q, steps) history. User level: one
Poisson-subsampled Gaussian release per round (`fedtune.privacy.user_level`). Before a
round starts, `stop_reason` says whether it could push either level past its budget.
"""

from __future__ import annotations

from typing import Any

from fedtune.checkpoint import ServerState
from fedtune.config import ExperimentConfig
from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.user_level import UserLevelAccount, calibrate_user_noise
from fedtune.task import Task


class PrivacyLedger:
    def __init__(self, cfg: ExperimentConfig, task: Task, state: ServerState) -> None:
        self.cfg = cfg
        self.task = task
        self.state = state
        user = cfg.privacy.user
        self.user: UserLevelAccount | None = None
        if user.enabled:
            cohort, population = cfg.train.clients_per_round, cfg.data.num_clients
            sigma = user.noise_multiplier or calibrate_user_noise(
                user.target_epsilon, user.delta, cohort, population, cfg.train.rounds)
            self.user = UserLevelAccount(sigma, cohort, population, user.delta,
                                         releases=state.user_releases)

    # -- before a round

    def stop_reason(self, rnd: int, cohort: list[int]) -> str | None:
        """Why round `rnd` must not run (its spend could exceed a budget), or None."""
        user = self.cfg.privacy.user
        if self.user is not None:
            after = self.user.epsilon(self.user.releases + 1)
            if after is not None and after > user.target_epsilon:
                return (f"round {rnd} would raise the user-level epsilon to {after:.4f}, over "
                        f"privacy.user.target_epsilon={user.target_epsilon}")
        sample = self.cfg.privacy.sample
        # Calibrated noise keeps a client that trains in every round within its target
        # by construction; a given noise multiplier has to be checked client by client.
        if sample.enabled and sample.noise_multiplier > 0:
            for pid in cohort:
                after = self._projected_sample_epsilon(pid)
                if after > sample.target_epsilon:
                    return (f"round {rnd} would raise client {pid}'s sample-level epsilon to "
                            f"{after:.4f}, over privacy.sample.target_epsilon="
                            f"{sample.target_epsilon}")
        return None

    def _projected_sample_epsilon(self, pid: int) -> float:
        sample = self.cfg.privacy.sample
        n = len(self.task.partitions[pid])
        history = DPHistory(list(self.state.client_dp.get(pid, DPHistory()).entries))
        history.add(sample.noise_multiplier, min(self.cfg.train.batch_size, n) / n,
                    self.cfg.train.local_steps)
        return float(epsilon_of(history, sample.delta, sample.accountant) or 0.0)

    # -- after a round

    def record_round(self, clients: list[dict[str, Any]]) -> None:
        """Take in what this round's clients spent (accepted and rejected alike: a
        rejected client trained on its data too), and one user-level release."""
        for client in clients:
            if "partition_id" not in client:
                continue
            pid = int(client["partition_id"])
            if "epsilon" in client:
                self.state.client_eps[pid] = max(self.state.client_eps.get(pid, 0.0),
                                                 float(client["epsilon"]))
            if float(client.get("noise_multiplier", 0.0)) > 0:
                self.state.client_dp.setdefault(pid, DPHistory()).add(
                    float(client["noise_multiplier"]), float(client["sample_rate"]),
                    int(client["steps"]))
        if self.user is not None:
            self.user.record()
            self.state.user_releases = self.user.releases

    def fields(self) -> dict[str, Any]:
        """Both epsilons and the parameters that reproduce them, for the ledger."""
        sample, user = self.cfg.privacy.sample, self.cfg.privacy.user
        eps_sample = max(self.state.client_eps.values()) if self.state.client_eps else None
        return {
            "epsilon_sample": eps_sample,
            "epsilon_user": self.user.epsilon() if self.user is not None else None,
            "delta": sample.delta if sample.enabled else (user.delta if user.enabled else None),
            "privacy_sample": self._sample_params() if sample.enabled else None,
            "privacy_user": self._user_params() if self.user is not None else None,
        }

    def _sample_params(self) -> dict[str, Any]:
        dp = self.cfg.privacy.sample
        return {
            "accountant": dp.accountant,
            "delta": dp.delta,
            "max_grad_norm": dp.max_grad_norm,
            "target_epsilon": dp.target_epsilon,
            "noise_multiplier": dp.noise_multiplier or "calibrated per client (see per_client)",
            "planned_steps": self.cfg.train.rounds * self.cfg.train.local_steps,
            "grad_sample_mode": dp.grad_sample_mode,
        }

    def _user_params(self) -> dict[str, Any]:
        assert self.user is not None
        user = self.cfg.privacy.user
        return {**self.user.params(), "clipping": user.clipping, "clip_norm": user.clip_norm,
                "target_epsilon": user.target_epsilon,
                "noise_std": self.user.noise_multiplier * user.clip_norm / self.user.cohort}

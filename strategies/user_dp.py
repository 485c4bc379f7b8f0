"""User-level DP rounds: our delta strategy inside Flower's DP-FedAvg wrappers.

Flower's `DifferentialPrivacy{Server,Client}SideFixedClipping` clip and add noise to model
arrays (`reply - current`), not to deltas. So each round the server (1) validates the raw
delta replies with `DeltaFedAvg.screen`, (2) turns each accepted delta into the
`global + delta` form the wrapper expects (float64, so clipping is exact), and (3) lets the
wrapper clip (server side) and add noise N(0, (sigma C / cohort)^2) to the mean that
`DeltaFedAvg` computes with a fixed denominator. With client-side clipping the clients clip
(the wrapper sends them the norm) and the server rejects any delta over it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from fedtune.config import UserDPConfig
from fedtune.delta import clip_to_norm
from strategies.delta_fedavg import DeltaFedAvg

WRAPPERS = {"server": DifferentialPrivacyServerSideFixedClipping,
            "client": DifferentialPrivacyClientSideFixedClipping}
# Client-side clipping is checked to this relative tolerance (float32 rounding of the norm).
CLIP_TOLERANCE = 1e-5


class UserDPRounds:
    """Drives `inner` through Flower's DP wrapper, one round at a time."""

    def __init__(self, inner: DeltaFedAvg, cfg: UserDPConfig, noise_multiplier: float,
                 population: int) -> None:
        self.inner = inner
        self.cfg = cfg
        cohort = inner.clients_per_round
        inner.poisson_rate = cohort / population
        inner.fixed_denominator = cohort
        self.wrapper = WRAPPERS[cfg.clipping](inner, noise_multiplier, cfg.clip_norm, cohort)

    def configure_train(self, server_round: int, vector: np.ndarray, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        arrays = ArrayRecord({"vector": Array(np.asarray(vector, dtype=np.float64))})
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> np.ndarray:
        """The new global vector: mean of the clipped deltas over the expected cohort,
        plus noise; every round releases one, even with no valid reply."""
        accepted = self.inner.screen(server_round, replies)
        base = self.inner._global.astype(np.float64)  # noqa: SLF001 (set by configure_train)
        limit = self.cfg.clip_norm * (1 + CLIP_TOLERANCE)
        weights = {c["node"]: c["weight"] for c in self.inner.outcome.accepted}
        as_model = []
        for msg, delta in accepted:
            norm = float(np.linalg.norm(delta.astype(np.float64)))
            if self.cfg.clipping == "client" and norm > limit:
                self.inner.reject(server_round, msg, f"delta norm {norm:.6g} exceeds "
                                  f"privacy.user.clip_norm={self.cfg.clip_norm} "
                                  "(client-side clipping)")
                continue
            weight = weights[msg.metadata.src_node_id]
            if weight != 1.0:
                # Clip first, then weight: the wrapper's own clipping is then a no-op and
                # a weight <= 1 can only shrink what one client contributes.
                delta = clip_to_norm(delta, self.cfg.clip_norm) * weight
            msg.content = RecordDict({
                "delta": ArrayRecord({"vector": Array(base + delta.astype(np.float64))}),
                "metrics": msg.content["metrics"]})
            as_model.append(msg)
        # Flower's flat clipping divides by the norm: a zero delta would crash it. It adds
        # nothing to the sum (the denominator is fixed), so it skips the wrapper.
        moved = [bool(np.any(m.content["delta"]["vector"].numpy() != base)) for m in as_model]
        arrays, _ = self.wrapper.aggregate_train(
            server_round, [m for m, keep in zip(as_model, moved, strict=True) if keep])
        self.inner.outcome.aggregated_norms += [0.0] * moved.count(False)
        if arrays is None:
            # Nothing to average (nobody sampled, replied validly, or moved). The round is
            # still a release, accounted like every other: the global vector plus the same
            # noise, so whether anyone contributed stays hidden.
            arrays = self.wrapper._add_noise_to_aggregated_arrays(  # noqa: SLF001
                ArrayRecord({"vector": Array(base.copy())}))
        return np.asarray(arrays["vector"].numpy(), dtype=np.float32)

"""DP on the smashed data: what a split client sends up is clipped per example and noised.

Adversary: the server (and anyone who sees the split traffic). It receives, per split step,
the cut-layer activations and the gradients at the body output of the step's Poisson batch.

Mechanism, per split step. Each sampled example's activations (all positions, flattened) are
clipped to L2 norm C_a and its body-output gradient (the gradient of its own loss, not the
batch mean's) to C_g. The step always sends exactly `slots` rows: the b sampled examples at
slots drawn uniformly at random from the secret DP source (the same slots for both
tensors of the step), zero rows in the others, and every row gets Gaussian noise of std
sigma * C_a (activations) or sigma * C_g (gradients). The attention mask sent up is all
ones, so it carries no sequence lengths. Rows are the only data-dependent thing that leaves.

Accounting. Neighbouring relation: add or remove one example of the client's data (the
relation Opacus' DP-SGD accounting uses). Adding example x, if it is sampled, turns one
zero row into x's row (the random slots make the release the same as x taking a zero row's
place, with no other row moving): L2 sensitivity C_a for the activations and C_g for the
gradients,
so each release is a Gaussian mechanism with noise multiplier sigma, and the pair of one
step is one Gaussian with multiplier sigma / sqrt(2). The batch is the DP-SGD Poisson
batch, shared with the DP-SGD update of the same step; releases that share one Poisson
draw must not be accounted as independently subsampled (that under-reports: see
tests/test_split_privacy.py), so a split step is accounted as ONE Poisson-subsampled
Gaussian whose multiplier joins the smashed pair and DP-SGD's noise:
    1 / sigma_joint^2 = 2 / sigma^2 + 1 / sigma_dpsgd^2.
The client's history gets this joint event on top of DP-SGD's own entries, which counts the
DP-SGD release of split steps twice: an upper bound, never an under-report.

The slot count is fixed in advance from the expected batch size, so that a Poisson batch
larger than it has probability at most `OVERFLOW_PROBABILITY` per step (Chernoff bound); such
a batch is refused with an error rather than truncated or sent larger (either would reveal
or change what the analysis covers).
"""

from __future__ import annotations

import math

import torch

from fedtune.privacy.randomness import DPRandom

# Upper bound on P(Poisson batch > slots) per split step (it adds at most this per step to
# delta; the ledger states it).
OVERFLOW_PROBABILITY = 1e-12


def slot_count(batch_size: int, overflow: float = OVERFLOW_PROBABILITY) -> int:
    """Rows every split step sends: the smallest m with P(batch > m) <= overflow, for a
    Poisson batch of expected size at most batch_size + 1 (the +1: a neighbouring dataset
    holds one more example). Chernoff: P(X >= m) <= exp(-mu) (e mu / m)^m for m > mu."""
    mu = float(batch_size + 1)
    m = int(math.ceil(mu)) + 1
    while -mu + m * (1 + math.log(mu / m)) > math.log(overflow):
        m += 1
    return m


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each example (first dimension) scaled to L2 norm at most `max_norm`."""
    norms = x.flatten(1).norm(dim=1) if x.dim() > 1 else x.abs()
    scale = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return x * scale.view(-1, *([1] * (x.dim() - 1)))


def pair_multiplier(sigma: float) -> float:
    """Noise multiplier of one step's activation + gradient releases as one Gaussian."""
    return sigma / math.sqrt(2.0)


def joint_multiplier(*sigmas: float) -> float:
    """One Gaussian equivalent to independent Gaussian releases of one sampled batch, each
    with noise multiplier sigma_k: 1 / sigma^2 = sum 1 / sigma_k^2."""
    return 1.0 / math.sqrt(sum(1.0 / s ** 2 for s in sigmas))


class SmashedNoise:
    """Clips and noises what a split client sends up; one per client and round."""

    def __init__(self, sigma: float, activation_clip: float, gradient_clip: float,
                 slots: int, source: DPRandom, device: torch.device | str = "cpu") -> None:
        if sigma <= 0:
            raise ValueError(f"smashed-data noise multiplier must be > 0, got {sigma}")
        self.sigma = sigma
        self.activation_clip = activation_clip
        self.gradient_clip = gradient_clip
        self.slots = slots
        # Slots and noise: `fedtune.privacy.randomness`, never a torch generator.
        self.source = source
        self.device = torch.device(device)

    def place(self, b: int) -> torch.Tensor:
        """Slots for a step's b examples, drawn at random from the DP source (secret):
        where an example lands must not depend on the others in the batch."""
        if b > self.slots:
            raise RuntimeError(
                f"a Poisson batch of {b} examples exceeds the {self.slots} smashed-DP slots "
                f"of a split step (probability <= {OVERFLOW_PROBABILITY:g}); refusing to "
                "send it, since a larger or truncated release is not what is accounted")
        return self.source.permutation(self.slots, device=self.device)[:b]

    def activations(self, smashed: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The rows to send for a batch's cut-layer states: clipped, placed, noised."""
        return self._release(smashed, self.activation_clip, slots)

    def gradients(self, grad: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The rows to send for a batch's per-example body-output gradients."""
        return self._release(grad, self.gradient_clip, slots)

    def dummy(self, shape: tuple[int, ...], clip: float, like: torch.Tensor) -> torch.Tensor:
        """A release of no example at all (an empty Poisson batch still sends its rows)."""
        zeros = torch.zeros((0, *shape), dtype=like.dtype, device=like.device)
        return self._release(zeros, clip, self.place(0))

    def mask(self, positions: int, like: torch.Tensor) -> torch.Tensor:
        """The attention mask sent with the rows: all ones, so no lengths leave."""
        return torch.ones((self.slots, positions), dtype=like.dtype, device=like.device)

    def _release(self, rows: torch.Tensor, clip: float, slots: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] != slots.shape[0]:
            raise ValueError(f"{rows.shape[0]} rows for {slots.shape[0]} slots")
        padded = torch.zeros((self.slots, *rows.shape[1:]), dtype=rows.dtype,
                             device=rows.device)
        padded[slots.to(rows.device)] = clip_rows(rows.detach(), clip)
        noise = self.source.normal(padded.shape, self.sigma * clip, dtype=padded.dtype,
                                   device=padded.device)
        return padded + noise

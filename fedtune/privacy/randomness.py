"""Where DP randomness comes from: the one source of every DP draw.

Adversary. Anyone who sees what a DP mechanism releases (the server, an eavesdropper on the
updates or the split traffic, whoever holds the run folder) and knows everything else about
the computation: the config and its `seed`, the code, the global model, even the client's
data. The noise and the sampling must be unpredictable to that adversary, or it subtracts
the noise and the guarantee is gone. The audit of issue 26 did exactly that: torch's CPU
generator keeps only the low 32 bits of a seed, so 2^32 guesses (38-53 core-hours)
recovered DP-SGD noise and the smashed-data noise and slots of a run.

Mechanism. Every draw (DP-SGD noise, Poisson batches, smashed-data noise and slots,
user-level cohorts and noise) comes from a `DPRandom`: ChaCha20 in counter mode, keyed with
256 bits. ChaCha20 (RFC 8439, via the `cryptography` package, i.e. OpenSSL) is a stream
cipher: its keystream is indistinguishable from uniform bits without the key, and seeing
any amount of it reveals nothing about the key or about another part of it. So:

- the secret state is the whole 256-bit key (no library truncates it: we never hand it to
  a library generator), and brute force costs 2^255 trials on average; >= 128 bits is the
  usual bar past which exhaustive search is out of reach for any adversary, 256 leaves
  margin (multi-target search over many keys, Grover halves the exponent);
- each draw takes its own 96-bit nonce (a draw counter) under the key, so draws are
  independent blocks of keystream: the noise of one step tells nothing about another's,
  nor about the Poisson masks or the slots (no re-keying of a mutable generator needed);
- the bits become values here, in plain arithmetic: uniforms with 53 bits, Gaussians by
  Box-Muller in float64 (then cast), Bernoulli masks by comparison, permutations by sorting
  distinct 64-bit keys. Opacus gets them through its public API (fedtune.privacy.dpsgd).
Numpy's Philox (128-bit key) was the alternative: fast, but not designed or analysed as a
cipher. ChaCha20 costs ~10-25 ms per 1e6 Gaussians on one CPU core, negligible next to a
training step.

Secret mode (default). Each `DPRandom.secret()` takes 256 fresh bits from the OS CSPRNG
(`secrets`) per use (one client's round, one server round's draw). The key lives only in
the object: never stored, logged, checkpointed or sent. Its repr shows no key, and it
refuses to be pickled or copied, so it cannot reach a Ray object, a checkpoint or a temp
file by accident; no exception message carries it.

Reproducible mode (`privacy.reproducible_noise = true`) derives the key from the run's seed
and a stream name (SHA-256), so a simulation study re-runs bit for bit. Its epsilons hold
against nobody who has the config, and every place that shows them carries
`SEEDED_NOISE_NOTE`.

Everything that is not DP randomness (initialisation, partitions, evaluation order, fault
injection, plain training's shuffling) stays seeded from `seed` in both modes;
tests/test_dp_randomness.py lists it and fails on any other draw on a DP path.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEEDED_NOISE_NOTE = "seeded noise: not a guarantee against anyone who has the config"
SECRET_NOISE_NOTE = ("secret noise: DP noise and sampling drawn from the OS CSPRNG, "
                     "never stored or sent")

KEY_BYTES = 32  # ChaCha20's key: 256 bits of secret state
_DOMAIN = b"fedtune/dp-randomness/v1"
# RFC 8439 counter layout as `cryptography` takes it: a 32-bit block counter, then a 96-bit
# nonce. One draw is one nonce, so it may use at most 2^32 blocks of 64 bytes.
_MAX_DRAW_BYTES = (1 << 32) * 64
_MAX_DRAWS = 1 << 96


def noise_note(reproducible: bool) -> str:
    """The line every epsilon is shown with: what the noise is secret from."""
    return SEEDED_NOISE_NOTE if reproducible else SECRET_NOISE_NOTE


def dp_source(stream: str, reproducible_seed: int | None = None) -> DPRandom:
    """The DP randomness for one use (`stream` names it: "noise", "poisson", ...): a fresh
    secret key, or, in reproducible-noise mode only, one derived from (seed, stream)."""
    if reproducible_seed is None:
        return DPRandom.secret(stream)
    return DPRandom.seeded(reproducible_seed, stream)


class DPRandom:
    """ChaCha20 keystream turned into the values DP mechanisms consume. Build it with
    `secret` or `seeded` (or `dp_source`); each method call is one independent draw."""

    __slots__ = ("_cipher_key", "_draws", "_lock", "reproducible", "stream")

    def __init__(self, key: bytes, stream: str, reproducible: bool) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a DP randomness key has {KEY_BYTES} bytes, got {len(key)}")
        self._cipher_key = bytes(key)
        self._draws = 0
        # A nonce used twice would repeat a draw: allocate them under a lock.
        self._lock = threading.Lock()
        self.stream = stream
        self.reproducible = reproducible

    @classmethod
    def secret(cls, stream: str) -> DPRandom:
        """Keyed with 256 fresh bits from the OS CSPRNG (bound to `stream`, so two uses
        never share a keystream even if they shared entropy)."""
        return cls(_derive(b"secret", stream, secrets.token_bytes(KEY_BYTES)), stream, False)

    @classmethod
    def seeded(cls, seed: int, stream: str) -> DPRandom:
        """Reproducible-noise mode only: the key follows from (seed, stream)."""
        return cls(_derive(b"seeded", stream, str(int(seed)).encode()), stream, True)

    def __repr__(self) -> str:
        mode = "seeded" if self.reproducible else "secret"
        return f"DPRandom({mode}, stream={self.stream!r}, draws={self._draws})"

    def __reduce_ex__(self, protocol: object) -> object:
        # Pickling (Ray objects, checkpoints, multiprocessing) and copy/deepcopy go through
        # here: a secret key never leaves the object it was made in.
        raise TypeError(f"DP randomness ({self.stream!r}) cannot be pickled or copied: its "
                        "key must never leave the process")

    # -- raw bits -----------------------------------------------------------------------

    def _keystream(self, nbytes: int) -> bytes:
        if nbytes > _MAX_DRAW_BYTES:
            raise ValueError(f"one DP draw of {nbytes} bytes exceeds ChaCha20's "
                             f"{_MAX_DRAW_BYTES} per nonce; draw in parts")
        with self._lock:
            if self._draws >= _MAX_DRAWS:
                raise RuntimeError("DP randomness source exhausted its nonces; make a new one")
            draw = self._draws
            self._draws += 1
        nonce = bytes(4) + draw.to_bytes(12, "little")  # block counter 0, then the draw number
        encryptor = Cipher(algorithms.ChaCha20(self._cipher_key, nonce), mode=None).encryptor()
        return encryptor.update(bytes(nbytes))

    def _words(self, n: int) -> np.ndarray:
        """n independent uniform 64-bit words (one draw)."""
        return np.frombuffer(self._keystream(8 * n), dtype=np.uint64)

    # -- values -------------------------------------------------------------------------

    def uniform(self, n: int) -> np.ndarray:
        """n uniforms in [0, 1), float64 with 53 random bits each."""
        return (self._words(_count(n, "uniform")) >> np.uint64(11)).astype(np.float64) * (
            2.0 ** -53)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """A Poisson-sampling mask: n independent booleans, each True with probability p."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a Bernoulli probability must be in [0, 1], got {p}")
        return self.uniform(n) < p

    def permutation(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uniformly random permutation of range(n) (int64): the order of n distinct
        random 64-bit keys. Ties (probability < n^2 / 2^65) are drawn again, so the result
        is exactly uniform."""
        n = _count(n, "permutation")
        while True:
            keys = self._words(n)
            order = np.argsort(keys, kind="stable")
            if n < 2 or bool(np.all(np.diff(keys[order]) > 0)):
                return torch.from_numpy(order.astype(np.int64)).to(device)

    def normal(self, shape: Sequence[int] | torch.Size, std: float = 1.0, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """Gaussian noise N(0, std^2) of `shape`, `dtype` on `device`: Box-Muller in
        float64 on the device from this source's uniforms, then cast."""
        if not (std >= 0.0 and np.isfinite(std)):
            raise ValueError(f"a noise standard deviation must be finite and >= 0, got {std}")
        shape = torch.Size(shape)
        n = _count(shape.numel(), "normal")
        pairs = (n + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs)).to(device)
        # 1 - u is in (0, 1], so the log is finite: radii up to sqrt(2 * 53 ln 2) = 8.6.
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs])) * std
        angle = (2.0 * torch.pi) * u[pairs:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return z.to(dtype).reshape(shape)


def _derive(mode: bytes, stream: str, material: bytes) -> bytes:
    """The ChaCha20 key of one stream: SHA-256 over a domain tag, the mode, the stream name
    and the key material (fresh OS entropy, or the seed in reproducible mode)."""
    name = stream.encode()
    return hashlib.sha256(b"\0".join([_DOMAIN, mode, len(name).to_bytes(4, "little") + name,
                                      material])).digest()


def _count(n: int, what: str) -> int:
    n = int(n)
    if n < 0:
        raise ValueError(f"a {what} draw needs a count >= 0, got {n}")
    return n

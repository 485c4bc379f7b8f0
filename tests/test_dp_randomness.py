"""DP-SGD noise and Poisson sampling are secret by default: nothing in the config (its
`seed` included) determines them, so an adversary who re-runs the client's computation from
the config cannot cancel the noise. `privacy.reproducible_noise = true` is the one mode
where the same config gives the same draws. The accounted sample rate is the rate the
Poisson loader really samples at."""


import torch
from torch.utils.data import TensorDataset

from clients.train import local_train
from fedtune.config import load_config
from fedtune.privacy import DPHistory
from fedtune.tuning import build_tuned_model

BASE = ["tuning.prompt.length=4", "train.batch_size=8", "train.local_steps=2",
        "train.optimizer=sgd", "train.lr=0.5", "privacy.sample.noise_multiplier=1.0",
        "privacy.sample.target_epsilon=1000", "privacy.sample.max_grad_norm=1.0"]




def _data(n=24, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2900, (n, length), generator=g)
    return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=g))


def _delta(backbone, sets, data=None, seed=5):
    """The delta one client's round produces, as the adversary would recompute it from the
    config, the seed, the data and the global model (all of which it has here)."""
    cfg = load_config(None, BASE + sets)
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=cfg.seed)
    start = torch.cat([t.detach().flatten().clone() for t in model.trainable_state().values()])
    result = local_train(model, data or _data(), cfg, DPHistory(), seed=seed)
    end = torch.cat([t.detach().flatten() for t in model.trainable_state().values()])
    return end - start, result, cfg


def _noise_norm(cfg, result, size):
    """Norm of the Gaussian noise one DP-SGD step adds to the update: lr * sigma * C /
    expected batch per coordinate (Opacus averages the noised sum over the expected batch)."""
    per_coord = (cfg.train.lr * result.noise_multiplier * cfg.privacy.sample.max_grad_norm
                 / (result.sample_rate * 24))
    return per_coord * size ** 0.5


def test_regenerating_the_noise_from_the_seed_does_not_remove_it(tiny_backbone):
    # The audit's attack: re-run the client with everything the config fixes; if the noise
    # and the Poisson masks followed from `seed`, the two deltas would be bit-identical and
    # their difference would leave the exact sum of clipped gradients.
    sets = ["train.local_steps=1"]
    released, result, cfg = _delta(tiny_backbone, sets)
    regenerated, _, _ = _delta(tiny_backbone, sets)
    residual = float((released - regenerated).norm())
    # Two independent noise draws differ by sqrt(2) x one draw's norm; allow a wide margin.
    assert residual > 0.5 * _noise_norm(cfg, result, released.numel()), residual


def test_two_default_runs_of_one_config_give_different_deltas(tiny_backbone):
    a, _, _ = _delta(tiny_backbone, [])
    b, _, _ = _delta(tiny_backbone, [])
    assert not torch.equal(a, b)


def test_reproducible_noise_gives_identical_deltas(tiny_backbone):
    sets = ["privacy.reproducible_noise=true"]
    a, _, _ = _delta(tiny_backbone, sets)
    b, _, _ = _delta(tiny_backbone, sets)
    assert torch.equal(a, b)
    c, _, _ = _delta(tiny_backbone, sets, seed=6)  # another client seed: other draws
    assert not torch.equal(a, c)


def test_plain_training_stays_seeded(tiny_backbone):
    # Shuffling without DP is not DP randomness: it follows `seed`, so runs reproduce.
    sets = ["privacy.sample.enabled=false"]
    a, _, _ = _delta(tiny_backbone, sets)
    b, _, _ = _delta(tiny_backbone, sets)
    assert torch.equal(a, b)


def test_the_accounted_sample_rate_is_the_rate_the_loader_samples_at(tiny_backbone):
    # n = 24, batch 10: B/n = 0.417, but a Poisson loader built from a DataLoader of
    # ceil(24/10) = 3 batches samples at 1/3. The accountant must be told the real rate.
    steps = 400
    sets = ["train.batch_size=10", f"train.local_steps={steps}", "train.lr=1e-6"]
    _, result, _ = _delta(tiny_backbone, sets)
    trials = steps * 24
    empirical = result.examples_seen / trials
    std = (result.sample_rate * (1 - result.sample_rate) / trials) ** 0.5
    assert abs(empirical - result.sample_rate) < 5 * std, (empirical, result.sample_rate)


# ------------------------------------------------------------------ 128-bit secret state
# The audit's seed-space attack: torch's CPU generator keeps only the low 32 bits of its
# seed, so a 64-bit CSPRNG seed gave 2^32 candidate noise streams. The tests below fix the
# OS entropy (secrets) to two values that differ only above bit 32, or only above bit 64,
# and require different DP draws.

import secrets  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fedtune.config import SampleDPConfig  # noqa: E402
from fedtune.privacy import make_private  # noqa: E402

_BASE_ENTROPY = int.from_bytes(bytes(range(1, 33)), "little")  # any fixed 256-bit value
ABOVE_32, ABOVE_64 = 1 << 40, 1 << 100


def _fix_entropy(monkeypatch, flip: int) -> None:
    """Make the OS CSPRNG return `_BASE_ENTROPY ^ flip` (truncated to what is asked)."""
    value = _BASE_ENTROPY ^ flip
    monkeypatch.setattr(secrets, "randbits", lambda k: value & ((1 << k) - 1))
    monkeypatch.setattr(secrets, "token_bytes",
                        lambda n=32: (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little"))


def _opacus_draws(n: int = 64, batch: int = 8):
    """What one secret-mode make_private draws: the Poisson batches of one pass and
    the noise Opacus adds to a zero gradient sum (an empty batch's step)."""
    from clients.train import _empty_batch_step

    torch.manual_seed(0)  # the model's init only: the same in every call
    model = nn.Linear(6, 3)
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 6)
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                           DataLoader(data, batch_size=batch), SampleDPConfig(), 1.0)
    try:
        picks = [xs[:, 0].tolist() for xs, _ in private.loader]
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        private.optimizer.zero_grad()
        _empty_batch_step(private.optimizer, model, "hooks")
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
    finally:
        private.close()
    return picks, after - before


@pytest.mark.parametrize("flip", [ABOVE_32, ABOVE_64], ids=["above-bit-32", "above-bit-64"])
def test_opacus_noise_and_poisson_batches_depend_on_high_key_bits(monkeypatch, flip):
    _fix_entropy(monkeypatch, 0)
    picks_a, noise_a = _opacus_draws()
    _fix_entropy(monkeypatch, flip)
    picks_b, noise_b = _opacus_draws()
    assert float(noise_a.abs().min()) > 0  # a noised step
    assert not torch.equal(noise_a, noise_b)
    assert picks_a != picks_b

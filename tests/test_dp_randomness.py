"""DP-SGD noise and Poisson sampling are secret by default: nothing in the config (its
`seed` included) determines them, so an adversary who re-runs the client's computation from
the config cannot cancel the noise. `privacy.reproducible_noise = true` is the one mode
where the same config gives the same draws. The accounted sample rate is the rate the
Poisson loader really samples at.

Every DP draw comes from `fedtune.privacy.randomness` (ChaCha20, 256-bit keys): keys that
differ only above bit 32, or only above bit 64, give different draws of every kind, and the
audit's 32-bit seed-space attack finds nothing. (Where each draw site gets its randomness:
tests/test_dp_draw_sites.py.)"""

import copy
import pickle
import secrets

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.train import _empty_batch_step, local_train
from fedtune.config import GRAD_SAMPLE_MODES, SampleDPConfig, UserDPConfig, load_config
from fedtune.privacy import DPHistory, make_private
from fedtune.privacy.randomness import KEY_BYTES, DPRandom, dp_source
from fedtune.split.smashed_dp import SmashedNoise
from fedtune.tuning import build_tuned_model
from strategies import DeltaFedAvg
from strategies.user_dp import UserLevelDP

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
# seed, so a 64-bit CSPRNG seed gave 2^32 candidate noise streams. These tests fix the OS
# entropy (`secrets`) to values that differ only above bit 32, or only above bit 64, and
# require different draws of every kind.

_BASE_ENTROPY = int.from_bytes(bytes(range(1, 33)), "little")  # any fixed 256-bit value
ABOVE_32, ABOVE_64, TOP_BIT = 1 << 40, 1 << 100, 1 << 255
FLIPS = pytest.mark.parametrize("flip", [ABOVE_32, ABOVE_64, TOP_BIT],
                                ids=["above-bit-32", "above-bit-64", "bit-255"])


def _fix_entropy(monkeypatch, flip: int) -> None:
    """Make the OS CSPRNG return `_BASE_ENTROPY ^ flip` (truncated to what is asked)."""
    value = _BASE_ENTROPY ^ flip
    monkeypatch.setattr(secrets, "randbits", lambda k: value & ((1 << k) - 1))
    monkeypatch.setattr(secrets, "token_bytes",
                        lambda n=32: (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little"))


def _opacus_draws(n: int = 64, batch: int = 8):
    """What one secret-mode make_private draws: the Poisson batches of one pass and the
    noise Opacus adds to a zero gradient sum (an empty batch's step, SGD at lr 1: the
    parameters move by minus the noise over the expected batch size)."""
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
    return picks, (before - after) * private.optimizer.expected_batch_size


@pytest.mark.parametrize("flip", [ABOVE_32, ABOVE_64], ids=["above-bit-32", "above-bit-64"])
def test_opacus_noise_and_poisson_batches_depend_on_high_key_bits(monkeypatch, flip):
    _fix_entropy(monkeypatch, 0)
    picks_a, noise_a = _opacus_draws()
    _fix_entropy(monkeypatch, flip)
    picks_b, noise_b = _opacus_draws()
    assert float(noise_a.abs().min()) > 0  # a noised step
    assert not torch.equal(noise_a, noise_b)
    assert picks_a != picks_b


def _key(flip: int) -> bytes:
    return (_BASE_ENTROPY ^ flip).to_bytes(KEY_BYTES, "little")


DRAWS = {
    "noise": lambda src: src.normal((64,), 1.0),
    "poisson-mask": lambda src: torch.from_numpy(src.bernoulli(256, 0.25)),
    "permutation": lambda src: src.permutation(64),
    "uniform": lambda src: torch.from_numpy(src.uniform(64)),
}


@FLIPS
@pytest.mark.parametrize("kind", sorted(DRAWS))
def test_keys_differing_only_in_high_bits_give_different_draws(kind, flip):
    draw = DRAWS[kind]
    a = draw(DPRandom(_key(0), "x", reproducible=False))
    b = draw(DPRandom(_key(flip), "x", reproducible=False))
    assert not torch.equal(a, b)
    # One key, its next draw: a fresh nonce, other values.
    source = DPRandom(_key(0), "x", reproducible=False)
    assert not torch.equal(draw(source), draw(source))


@FLIPS
def test_secret_sources_of_every_mechanism_depend_on_high_entropy_bits(monkeypatch, flip):
    """The secret sources the mechanisms build (smashed noise and slots, user-level cohort
    and noise) follow every bit of the OS entropy they were keyed with."""
    def draws():
        noise = SmashedNoise(1.0, 1.0, 1.0, slots=16, source=dp_source("smashed"))
        slots = noise.place(5)
        rows = noise.activations(torch.zeros(5, 8), slots)
        spec_size, population = 32, 64
        strategy = DeltaFedAvg(_spec(spec_size), 8, seed=0)
        strategy.roster = {pid: 100 + pid for pid in range(population)}
        user = UserLevelDP(strategy, UserDPConfig(enabled=True, clip_norm=1.0), 1.0,
                           population)
        cohort = user.sample(1, FakeGrid([]))
        sent = user.configure_train(1, np.zeros(spec_size, np.float32), 0.1, [])
        released = user.aggregate_train(sent, []).vector
        return slots, rows, cohort, released

    _fix_entropy(monkeypatch, 0)
    slots_a, rows_a, cohort_a, released_a = draws()
    _fix_entropy(monkeypatch, flip)
    slots_b, rows_b, cohort_b, released_b = draws()
    assert not torch.equal(slots_a, slots_b)
    assert not torch.equal(rows_a, rows_b)
    assert cohort_a != cohort_b
    assert not np.array_equal(released_a, released_b)


def _spec(size):
    from wire import spec_of

    return spec_of(size)


def test_opacus_noise_is_the_sources_noise_and_no_32_bit_seed_reproduces_it(monkeypatch):
    """The audit's attack, cheap version: the noise of a step is exactly the ChaCha20 draw
    of the secret key (so it depends on all 256 bits, as the tests above show), and no
    torch generator seeded with a truncation of the entropy reproduces it or correlates
    with it."""
    _fix_entropy(monkeypatch, 0)
    _, noise = _opacus_draws()
    _fix_entropy(monkeypatch, 0)
    expected = DPRandom.secret("noise").normal(noise.shape, 1.0)  # sigma 1 x C 1
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-6)
    digest_words = [int.from_bytes(_key(0)[i:i + 8], "little") for i in range(0, 32, 8)]
    candidates = {w & mask for w in [_BASE_ENTROPY, *digest_words]
                  for mask in ((1 << 32) - 1, (1 << 63) - 1)}
    for seed in candidates:
        guess = torch.normal(0.0, 1.0, noise.shape, generator=torch.Generator().manual_seed(seed))
        corr = float(torch.corrcoef(torch.stack([noise, guess]))[0, 1])
        assert abs(corr) < 0.6, (seed, corr)


# ------------------------------------------------------------------ the draws themselves

def test_draws_have_their_distributions():
    from scipy import stats

    # Seeded: three p-value checks at 1e-4 would fail one run in ~3,300 on a correct secret
    # source; the keystream is the same ChaCha20 either way.
    source = DPRandom.seeded(0, "test")
    z = source.normal((200_000,), 2.5, dtype=torch.float64).numpy()
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-4
    u = source.uniform(100_000)
    assert 0.0 <= u.min() and u.max() < 1.0 and stats.kstest(u, "uniform").pvalue > 1e-4
    mask = source.bernoulli(100_000, 0.125)
    assert abs(mask.mean() - 0.125) < 5 * (0.125 * 0.875 / 100_000) ** 0.5
    firsts = np.bincount([int(source.permutation(8)[0]) for _ in range(4000)], minlength=8)
    assert stats.chisquare(firsts).pvalue > 1e-4
    assert sorted(source.permutation(50).tolist()) == list(range(50))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        out = source.normal((3, 5), 1.0, dtype=dtype)
        assert out.shape == (3, 5) and out.dtype == dtype
    assert source.normal((0,), 1.0).numel() == 0 and source.permutation(0).numel() == 0
    with pytest.raises(ValueError, match="standard deviation"):
        source.normal((2,), float("nan"))
    with pytest.raises(ValueError, match="Bernoulli probability"):
        source.bernoulli(2, 1.5)


def test_seeded_sources_reproduce_and_secret_ones_do_not():
    for kind, draw in DRAWS.items():
        assert torch.equal(draw(dp_source("s", 7)), draw(dp_source("s", 7))), kind
        assert not torch.equal(draw(dp_source("s", 7)), draw(dp_source("t", 7))), kind
        # Seeds that differ only above bit 32 / 64 are other keys too.
        for other in (7 + (1 << 40), 7 + (1 << 80)):
            assert not torch.equal(draw(dp_source("s", 7)), draw(dp_source("s", other))), kind
        assert not torch.equal(draw(dp_source("s")), draw(dp_source("s"))), kind
    assert dp_source("s", 7).reproducible and not dp_source("s").reproducible


def test_a_secret_key_never_leaves_its_object(monkeypatch):
    _fix_entropy(monkeypatch, 0)
    source = DPRandom.secret("noise")
    key_hex = source._cipher_key.hex()  # only to check it does not appear anywhere
    assert key_hex not in repr(source) and _key(0).hex() not in repr(source)
    for leak in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled or copied") as err:
            leak(source)
        assert key_hex not in str(err.value)
    # A DP optimizer carrying the source cannot be pickled either (Ray, checkpoints).
    model = nn.Linear(2, 2)
    data = TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                           DataLoader(data, batch_size=4), SampleDPConfig(), 1.0)
    try:
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(private.optimizer.noise_source)
        assert private.optimizer.generator is None
    finally:
        private.close()


def _one_step(mode: str, sigma: float, seed: int) -> tuple[torch.Tensor, float]:
    """One reproducible-mode DP-SGD step of a linear model at lr 1 under grad-sample mode
    `mode`: the parameter change and the expected batch size."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                           DataLoader(data, batch_size=8), SampleDPConfig(grad_sample_mode=mode),
                           sigma, reproducible_seed=seed)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    try:
        assert type(private.optimizer).__name__.startswith("SecretNoise")
        assert private.optimizer.generator is None
        for x, y in private.loader:
            if y.numel():
                private.optimizer.zero_grad()
                private.criterion(private.model(x), y).backward()
                private.optimizer.step()
                break
    finally:
        private.close()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before, private.optimizer.expected_batch_size


@pytest.mark.parametrize("mode", sorted(GRAD_SAMPLE_MODES))
def test_every_grad_sample_mode_adds_the_sources_noise(mode):
    """Same seed, same Poisson batch: the noised step minus the noiseless one is exactly
    the source's noise (over the expected batch), in every grad-sample mode."""
    noised, batch = _one_step(mode, 1.0, seed=3)
    clean, _ = _one_step(mode, 0.0, seed=3)
    noise = dp_source("noise", 3).normal(noised.shape, 1.0)  # sigma 1 x C 1
    torch.testing.assert_close(clean - noised, noise / batch, rtol=1e-4, atol=1e-6)
    again, _ = _one_step(mode, 1.0, seed=3)
    assert torch.equal(noised, again)

"""Split mode's smashed data: what the server receives is clipped and noised per example
under `split.smashed_dp`, with secret noise by default, accounted jointly with DP-SGD; the
ledger says what the server sees in clear otherwise; the audit's attacks recover text and
labels from unprotected traffic and not from protected traffic."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from clients import split as split_client
from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import load_backbone
from fedtune.privacy import DPHistory, epsilon_of, planned_release
from fedtune.privacy.randomness import DPRandom
from fedtune.split import InProcessBody, SplitPromptModel
from fedtune.split.cut import SplitBackbone
from fedtune.split.disclosure import (
    DELTAS_ONLY,
    WITH_SMASHED,
    dp_level_label,
    split_disclosure,
)
from fedtune.split.ledger_fields import split_round_fields, split_summary_fields
from fedtune.split.plan import smashed_plan, smashed_privacy_events
from fedtune.split.smashed_dp import SmashedNoise, clip_rows, slot_count
from fedtune.tuning import build_tuned_model
from fedtune.wire.protocol import EXTRA_GROUPS, TrainReport

SMASHED = ["split.enabled=true", "split.smashed_dp.enabled=true", "train.batch_size=4",
           "tuning.prompt.length=4", "train.local_steps=2", "train.rounds=3"]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


class RecordingBody:
    """A body that keeps every tensor the server receives."""

    def __init__(self, body):
        self.body = body
        self.up: list[tuple[str, torch.Tensor]] = []

    def forward(self, smashed, mask):
        self.up += [("smashed", smashed.clone()), ("mask", mask.clone())]
        return self.body.forward(smashed, mask)

    def backward(self, grad):
        self.up.append(("grad", grad.clone()))
        return self.body.backward(grad)

    def evaluate(self, smashed, mask):
        return self.body.evaluate(smashed, mask)


def _data(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2900, (n, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[: n // 4, length // 2:] = 0
    return TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=g))


def _train(minilm, sets, seed=5, data=None):
    cfg = load_config(None, sets)
    data = data or _data()
    model = build_tuned_model(minilm, cfg.tuning, 2, seed=cfg.seed)
    view = SplitPromptModel(model, SplitBackbone(minilm.model, cfg.split.cut_layer))
    step = split_client.split_step(view, cfg, 2, n=len(data), seed=seed)
    recorder = RecordingBody(InProcessBody(view.split))
    step.body.body = recorder
    history = DPHistory()
    result = local_train(view, data, cfg, history, seed=seed, step=step)
    return cfg, step, recorder, history, result


def _sent(recorder, kind):
    return [t for k, t in recorder.up if k == kind]


# ----------------------------------------------------------------------------- mechanism


def test_noise_has_the_calibrated_std_and_rows_are_clipped_and_padded():
    noise = SmashedNoise(sigma=0.5, activation_clip=2.0, gradient_clip=3.0, slots=400,
                         source=DPRandom.seeded(0, "test"))
    big = torch.full((7, 50), 10.0)
    rows = noise.activations(big, noise.place(7))
    assert rows.shape == (400, 50)
    pure = noise.gradients(torch.zeros(0, 50), noise.place(0))  # the noise alone
    assert float(pure.std()) == pytest.approx(0.5 * 3.0, rel=0.02)
    assert float(pure.mean()) == pytest.approx(0.0, abs=0.02)
    # Real rows are the clipped input plus noise: the mean over many draws is the clip.
    fixed = torch.arange(7)
    draws = torch.stack([SmashedNoise(0.5, 2.0, 3.0, 8, DPRandom.seeded(s, "test"))
                         .activations(big, fixed)[:7] for s in range(400)])
    assert float(draws.mean(0)[0].norm()) == pytest.approx(2.0, rel=0.03)
    assert float(clip_rows(big, 2.0)[0].norm()) == pytest.approx(2.0)
    # The slots are a uniform draw: every slot is taken about equally often.
    counts = torch.bincount(torch.cat([noise.place(2) for _ in range(4000)]), minlength=400)
    assert counts.sum() == 8000 and int(counts.max()) <= 60
    with pytest.raises(RuntimeError, match="exceeds the 8 smashed-DP slots"):
        SmashedNoise(0.5, 2.0, 3.0, 8, DPRandom.secret("test")).place(9)


def test_slots_make_an_overflowing_batch_negligible():
    for batch in (4, 8, 32):
        m, mu = slot_count(batch), batch + 1
        # Exact Poisson tail at the bound's rate: far below the stated 1e-12.
        tail = 1 - sum(math.exp(-mu) * mu ** k / math.factorial(k) for k in range(m + 1))
        assert tail <= 1e-12 and m < 4 * batch + 20


def test_the_server_receives_only_clipped_noised_rows_in_fixed_slots(minilm):
    # Reproducible draws: a secret Poisson batch of this tiny client is empty about once
    # in a hundred runs, and an empty batch sends only zero rows (tested below).
    sets = SMASHED + ["split.smashed_dp.noise_multiplier=1e-6", "privacy.reproducible_noise=true",
                      "privacy.sample.accountant=rdp",
                      "split.smashed_dp.activation_clip_norm=3.0",
                      "split.smashed_dp.gradient_clip_norm=0.5"]
    cfg, step, recorder, _, result = _train(minilm, sets)
    slots = slot_count(4)
    smashed, masks, grads = (_sent(recorder, k) for k in ("smashed", "mask", "grad"))
    assert len(smashed) == len(grads) == result.steps == 2
    for rows, mask, grad in zip(smashed, masks, grads, strict=True):
        assert rows.shape[0] == mask.shape[0] == grad.shape[0] == slots
        assert bool((mask == 1).all())  # no lengths leave
        norms = rows.reshape(slots, -1).norm(dim=1)
        assert float(norms.max()) <= 3.0 + 1e-3
        # Real rows sit at the clip (MiniLM's states are far larger); the rest are zero
        # rows, and an example's gradient goes up in the slot of its activations.
        real = norms > 1.0
        assert 0 < int(real.sum()) < slots
        assert torch.allclose(norms[real], torch.full((int(real.sum()),), 3.0), atol=1e-3)
        gnorms = grad.reshape(slots, -1).norm(dim=1)
        assert float(gnorms.max()) <= 0.5 + 1e-3 and float(gnorms[~real].max()) < 1e-3
    assert result.extras["server-flops"] > 0


def test_noise_is_secret_by_default_and_seeded_only_in_reproducible_mode(minilm):
    def first_rows(extra, seed):
        _, _, recorder, _, _ = _train(minilm, SMASHED + extra, seed=seed)
        return _sent(recorder, "smashed")[0]

    default = [first_rows([], 5) for _ in range(2)]
    assert not torch.equal(default[0], default[1])
    seeded = [first_rows(["privacy.reproducible_noise=true"], 5) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the client's seed"):
        cfg = load_config(None, SMASHED + ["privacy.reproducible_noise=true"])
        model = build_tuned_model(minilm, cfg.tuning, 2, seed=0)
        view = SplitPromptModel(model, SplitBackbone(minilm.model, 1))
        split_client.split_step(view, cfg, 2, n=24)


def test_smashed_dp_needs_dp_sgd_and_the_example_count(minilm):
    with pytest.raises(ConfigError, match="needs privacy.sample.enabled=true"):
        load_config(None, SMASHED + ["privacy.sample.enabled=false"])
    cfg = load_config(None, SMASHED)
    view = SplitPromptModel(build_tuned_model(minilm, cfg.tuning, 2, seed=0),
                            SplitBackbone(minilm.model, 1))
    with pytest.raises(ValueError, match="example count"):
        split_client.split_step(view, cfg, 2)


# ----------------------------------------------------------------------------- accounting


def test_separate_events_under_report_a_shared_poisson_batch():
    """Why a split step is one joint event: two releases of one Poisson batch are one
    subsampled Gaussian with 1/s^2 = sum 1/s_k^2, whose epsilon exceeds that of the same
    two releases accounted as independently subsampled."""
    q, steps = 0.08, 30
    separate = epsilon_of(DPHistory([(1.0, q, steps), (1 / math.sqrt(2), q, steps)]),
                          1e-5, "prv")
    joint = epsilon_of(DPHistory([((1 + 2) ** -0.5, q, steps)]), 1e-5, "prv")
    assert joint > separate * 1.2


def test_epsilon_composes_dp_sgd_and_the_smashed_releases(minilm):
    cfg, step, _, history, result = _train(minilm, SMASHED)
    plan = smashed_plan(cfg, 24)
    sigma, q, steps = planned_release(cfg, 24)
    assert plan.dpsgd_sigma == result.noise_multiplier == sigma
    joint = (2 / plan.sigma ** 2 + 1 / sigma ** 2) ** -0.5
    assert step.privacy_events() == [(pytest.approx(joint), q, 2)]
    assert history.entries == [(sigma, q, steps), (pytest.approx(joint), q, 2)]
    dp_only = epsilon_of(DPHistory([(sigma, q, steps)]), cfg.privacy.sample.delta, "prv")
    assert result.epsilon > dp_only * 1.5
    # The server's charge for a client it asks to train is the same event.
    assert smashed_privacy_events(cfg, 24) == step.privacy_events()
    # Calibration: the smashed pair alone, over the planned split steps, is at the target.
    pair = epsilon_of(DPHistory([(plan.sigma / math.sqrt(2), q, 3 * 2)]), 1e-5, "prv")
    assert pair == pytest.approx(cfg.split.smashed_dp.target_epsilon, rel=0.02)
    assert pair <= cfg.split.smashed_dp.target_epsilon * (1 + 1e-6)


def test_no_smashed_events_without_smashed_dp(minilm):
    # Seeded noise: without smashed DP an empty batch sends nothing, and two secret Poisson
    # batches at q = 4/24 are both empty with chance (5/6)^48 = 1.6e-4; the seeded ones hold 5
    # and 4 rows.
    sets = [s for s in SMASHED if "smashed_dp" not in s] + ["privacy.reproducible_noise=true"]
    cfg, step, recorder, history, _ = _train(minilm, sets)
    assert step.privacy_events() == [] == smashed_privacy_events(cfg, 24)
    assert len(history.entries) == 1
    assert _sent(recorder, "smashed")[0].shape[0] < slot_count(4)  # the batch, in clear


def test_an_empty_poisson_batch_still_sends_its_rows(minilm):
    """local_train skips the step of an empty batch; the split step must still send that
    step's dummy rows, or the exchange count tells the server the batch was empty."""
    cfg = load_config(None, SMASHED)
    model = build_tuned_model(minilm, cfg.tuning, 2, seed=0)
    view = SplitPromptModel(model, SplitBackbone(minilm.model, 1))
    step = split_client.split_step(view, cfg, 3, n=24, seed=1)
    recorder = RecordingBody(InProcessBody(view.split))
    step.body.body = recorder
    data = _data()
    ids, mask, labels = (t[:2] for t in data.tensors)
    step(view, torch.nn.CrossEntropyLoss(), ids, mask, labels, 1)  # step 0 was empty
    assert len(_sent(recorder, "smashed")) == 2
    step.flops(view, data, 2)  # the round ends after an empty step 2
    assert len(_sent(recorder, "smashed")) == len(_sent(recorder, "grad")) == 3
    assert step.privacy_events()[0][2] == 3


# ----------------------------------------------------------------------------- the ledger


def test_the_ledger_says_what_the_server_sees_in_clear():
    figures = {"smashed_bytes_up": 10, "smashed_bytes_down": 10, "server_flops": 2.0,
               "split_steps": 1, "local_loss_steps": 0, "split_examples": 4,
               "local_loss_examples": 0, "client_flops_per_example": 0.25,
               "full_model_flops_per_example": 4.0, "probe_bytes": 0}
    report = TrainReport(steps=1, examples_seen=4, flops=1.0,
                         extras={s.key: figures[s.name] for s in EXTRA_GROUPS["split"]})
    assert report.split is not None and report.split.smashed_bytes_up == 10
    clear = load_config(None, ["split.enabled=true"])
    fields = split_round_fields([report], 1, 1, split_disclosure(clear))
    assert fields["split_privacy"]["epsilon_sample_covers"] == (
        "deltas only; smashed data in clear")
    assert any("label" in s for s in fields["split_privacy"]["server_sees_in_clear"])
    # Without the config the statement is the worst case, never a claim of protection.
    assert split_round_fields([report], 1, 1)["split_privacy"]["smashed_dp"] is None
    protected = load_config(None, ["split.enabled=true", "split.smashed_dp.enabled=true"])
    statement = split_round_fields([report], 1, 1, split_disclosure(protected))["split_privacy"]
    # Only what a node with its own data file sends at discovery, stated with that condition.
    assert len(statement["server_sees_in_clear"]) == 1
    assert "sent only when the node trains on its own data file" in (
        statement["server_sees_in_clear"][0])
    assert statement["smashed_dp"]["rows_per_split_step"] == slot_count(32)
    summary = split_summary_fields([{**fields, "delta_bytes_up": 1, "delta_bytes_down": 1}])
    assert summary["split_privacy"] == fields["split_privacy"]
    assert split_round_fields([], 1, 1, split_disclosure(load_config(None, []))) == {}
    assert dp_level_label(clear) == DELTAS_ONLY and dp_level_label(protected) == WITH_SMASHED
    assert dp_level_label(load_config(None, [])) is None


# ----------------------------------------------------------------------------- the attack


class _TinyTask:
    """A task on the real backbone with synthetic text: what `attack` reads of a Task."""

    num_labels = 2

    def __init__(self, backbone, cfg, n=96):
        self.backbone, self.cfg = backbone, cfg
        data = _data(n, 12, seed=3)
        ids, mask, labels = data.tensors
        self.train = SimpleNamespace(tensors=lambda rows: TensorDataset(
            ids[rows], mask[rows], labels[rows]))
        self.partitions = [torch.arange(0, 32).numpy(), torch.arange(32, n).numpy()]

    def new_model(self):
        return build_tuned_model(self.backbone, self.cfg.tuning, 2, seed=self.cfg.seed)

    def client_data(self, pid):
        return self.train.tensors(self.partitions[pid])


def _trained_state(task):
    """A global state whose tail is not the zero-initialised one (after some training)."""
    model = task.new_model()
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * 0.1 if k.startswith("head") else
            v.detach().clone() for k, v in model.trainable_state().items()}


@pytest.mark.parametrize("cut", [0, 1])
def test_the_attack_recovers_text_and_labels_in_clear_and_not_under_smashed_dp(minilm, cut):
    from fedtune.audit.cli import report_text
    from fedtune.audit.split_attack import attack

    # Reproducible draws: the figures below hold for every draw in expectation; fixed draws
    # keep a handful of examples from making the test flaky.
    base = ["split.enabled=true", f"split.cut_layer={cut}", "train.batch_size=8",
            "train.local_steps=2", "train.rounds=3", "tuning.prompt.length=4",
            "privacy.reproducible_noise=true"]
    clear_cfg = load_config(None, base)
    task = _TinyTask(minilm, clear_cfg)
    clear = attack(clear_cfg, task, _trained_state(task), victim=0, public_examples=64,
                   seed=1)
    assert clear.examples > 0 and not clear.smashed_dp
    assert clear.token_recovery >= 0.95 and clear.label_balanced >= 0.95
    # Its epsilon is shown with what weakens it (MARKS30): the console line and the JSON.
    assert "client epsilon after the round: " in report_text(clear, 0)
    assert report_text(clear, 0).endswith(" [seeded noise; data in clear]")
    assert "data in clear: " in json.dumps(clear.as_dict())
    noised_cfg = load_config(None, [*base, "split.smashed_dp.enabled=true",
                                    "split.smashed_dp.target_epsilon=1"])
    from fedtune.split import flops

    flops._CACHE.clear()  # measured once per process: make this round measure
    noised = attack(noised_cfg, _TinyTask(minilm, noised_cfg), _trained_state(task), 0, 64, 1)
    assert noised.smashed_dp and noised.token_recovery <= 0.02
    assert report_text(noised, 0).endswith(" [seeded noise]")
    assert noised.label_balanced <= 0.8
    # The attacker records the FLOP probe too (synthetic text, not the victim's rows).
    assert noised.probe_exchanges == 1 and noised.exchanges > noised.probe_exchanges


def test_smashed_dp_refuses_pruning_whose_scoring_sends_activations_in_clear():
    with pytest.raises(ConfigError, match="el2n_pruning"):
        load_config(None, SMASHED + ['plugins=[{name = "el2n_pruning", keep = 0.5, '
                                     'allow_with_sample_dp = true}]'])


def test_audit_cli_names_what_is_wrong_with_its_input(tmp_path):
    from typer.testing import CliRunner

    from fedtune.audit.cli import audit_app

    runner = CliRunner()
    missing = runner.invoke(audit_app, ["split", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no config.toml" in missing.output
    (tmp_path / "config.toml").write_text(load_config(None, []).to_toml())
    plain = runner.invoke(audit_app, ["split", str(tmp_path)])
    assert plain.exit_code == 2 and "not a split run" in plain.output


@pytest.mark.parametrize("seed", range(6))
def test_every_split_release_is_in_the_clients_history_also_after_empty_batches(minilm, seed):
    """A split step whose Poisson batch is empty still sends noise rows (so the server
    cannot tell); the ones at the end of a round were sent after the client had read its
    releases, so its own history missed them. Batch 1 of 16 examples: each step's batch is
    empty with probability (15/16)^16 = 0.36."""
    sets = SMASHED + ["train.batch_size=1", "privacy.reproducible_noise=true"]
    _, step, _, history, _ = _train(minilm, sets, seed=seed, data=_data(16))
    planned = step.smashed.total_steps
    assert step.steps["split"] == planned
    assert step.privacy_events()[0][2] == planned
    assert history.entries[-1][2] == planned

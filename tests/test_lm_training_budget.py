"""A causal-LM client's training forwards hold at most `fedtune.task.lm.LOGITS_BUDGET`
logits (rows x positions x vocabulary): a batch whose logits would pass it is trained in
parts (`clients.train.PlainStep`), with the same update as the whole batch, plain and under
DP-SGD (each part's per-sample gradients clipped into the one noised sum, Opacus' skip
step); split mode, whose tail runs the whole batch, is refused at build time instead. The
budget is lowered so a tiny random Llama (MiniLM's 30,522-word vocabulary) shows the
arithmetic in milliseconds."""

from __future__ import annotations

import pytest
import torch

from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import load_backbone
from fedtune.privacy import DPHistory
from fedtune.task.kinds import task_kind
from fedtune.task.lm import lm_targets
from fedtune.tuning import build_tuned_model

ROWS, LENGTH = 8, 12


def _lm_config(folder: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', "task.kind=causal_lm",
                              "data.partition=iid", f"model.max_length={LENGTH}",
                              f"train.batch_size={ROWS}", "train.local_steps=1",
                              "tuning.method=lora", "privacy.sample.enabled=false", *sets])


def _rows(n: int = ROWS):
    """Right-padded texts of different lengths (the loss weighs each by its own tokens)."""
    ids = torch.randint(1000, 2000, (n, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for i in range(1, n):
        mask[i, LENGTH - i:] = 0
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    return torch.utils.data.TensorDataset(ids, mask, labels)


def test_a_training_forward_holds_at_most_the_logits_budget(lm_folders, monkeypatch):
    """Invariant: a causal-LM training forward holds at most LOGITS_BUDGET logits (its
    batch cut to fit, as evaluation's is), or the config is refused in one line."""
    from fedtune.task import lm

    folder = lm_folders["llama"]
    cfg = _lm_config(folder)
    backbone = load_backbone(folder, kind="causal_lm")
    model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
    vocab = int(backbone.model.config.vocab_size)
    # Room for two rows' logits at once, not for the batch of eight.
    monkeypatch.setattr(lm, "LOGITS_BUDGET", 2 * LENGTH * vocab)
    try:
        task_kind("causal_lm").check_model(model, cfg)
    except ConfigError:
        return  # refused before training: the invariant holds
    ids = torch.randint(1000, 2000, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    seen: list[tuple[int, ...]] = []
    handle = model.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        local_train(model, torch.utils.data.TensorDataset(ids, mask, labels), cfg,
                    DPHistory(), seed=0)
    finally:
        handle.remove()
    assert seen
    over = [s for s in seen if s[0] * s[1] * s[2] > lm.LOGITS_BUDGET]
    assert not over, (f"{len(over)} of {len(seen)} training forwards held more than "
                      f"LOGITS_BUDGET={lm.LOGITS_BUDGET} logits, e.g. {over[0]} (rows, "
                      "positions, vocabulary): train.batch_size x model.max_length is unbounded "
                      "by the vocabulary")


@pytest.mark.parametrize("dp", [None, "hooks", "functorch", "ew"])
def test_a_batch_trained_in_parts_gives_the_whole_batchs_update(lm_folders, monkeypatch, dp):
    """Cut into parts of 3, 3 and 2 rows, two steps give the same trained tensors and loss
    as the whole batches: plain gradients are weighed by each part's share of the batch;
    under DP-SGD each part's per-sample gradients are clipped into the one sum that is
    noised once (the same reproducible noise both ways), in each grad-sample mode an LM
    accepts."""
    from fedtune.task import lm

    folder = lm_folders["llama"]
    sets = ["train.local_steps=2", "privacy.reproducible_noise=true"]
    if dp:
        sets += ["privacy.sample.enabled=true", "privacy.sample.max_grad_norm=0.05",
                 f"privacy.sample.grad_sample_mode={dp}"]
    cfg = _lm_config(folder, *sets)
    backbone = load_backbone(folder, kind="causal_lm")
    vocab = int(backbone.model.config.vocab_size)
    trained, losses, shapes = [], [], []
    for budget in (lm.LOGITS_BUDGET, 3 * LENGTH * vocab):
        monkeypatch.setattr(lm, "LOGITS_BUDGET", budget)
        model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
        seen: list[int] = []
        handle = model.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.append(out.shape[0]))
        try:
            result = local_train(model, _rows(), cfg, DPHistory(), seed=0)
        finally:
            handle.remove()
        shapes.append(seen)
        losses.append(result.loss)
        trained.append({k: v.detach().clone() for k, v in model.named_parameters()
                        if v.requires_grad})
    assert max(shapes[1]) <= 3 < max(shapes[0])  # the budget did cut the batches
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    whole, parts = trained
    assert whole.keys() == parts.keys() and whole
    moved = False
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    for name, tensor in build_tuned_model(backbone, cfg.tuning, 0, seed=0,
                                          kind="causal_lm").named_parameters():
        moved |= name in whole and not torch.equal(tensor, whole[name])
    assert moved  # the steps trained something


def test_split_mode_whose_batch_passes_the_budget_is_refused_in_one_line(lm_folders,
                                                                         monkeypatch):
    """Split mode's tail computes the whole batch's logits on the client (its exchange with
    the body is one batch): a batch past the budget is refused when the model is built,
    naming train.batch_size, model.max_length and the vocabulary."""
    from fedtune.task import lm

    folder = lm_folders["llama"]
    cfg = _lm_config(folder, "tuning.method=prompt", "tuning.prompt.length=3",
                     "split.enabled=true")
    backbone = load_backbone(folder, kind="causal_lm")
    model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
    vocab = int(backbone.model.config.vocab_size)
    monkeypatch.setattr(lm, "LOGITS_BUDGET", 2 * (LENGTH + 3) * vocab)
    with pytest.raises(ConfigError) as refused:
        task_kind("causal_lm").check_model(model, cfg)
    message = str(refused.value)
    assert f"train.batch_size={ROWS}" in message and f"model.max_length={LENGTH}" in message
    assert f"{vocab:,} words" in message and "train.batch_size <= 2" in message
    assert "\n" not in message
    monkeypatch.setattr(lm, "LOGITS_BUDGET", ROWS * (LENGTH + 3) * vocab)
    task_kind("causal_lm").check_model(model, cfg)  # a batch that fits is not refused

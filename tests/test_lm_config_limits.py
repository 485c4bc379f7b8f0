"""A causal-LM config against its limits: the generation metric's lengths and total work, a
text's room for a next token, the backbone's positions, and the DP modes each method trains
under. A config that cannot run is refused in one line naming the key; a metric it cannot
measure is null with a warning saying why; the console's final line holds either way."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedtune.config import ConfigError, load_config
from tests.lm_fixtures import LM, write_users


def test_a_run_whose_max_length_holds_no_prompt_and_continuation_says_so(caplog):
    """A causal-LM run whose model.max_length is shorter than generation_prompt_tokens +
    generation_new_tokens is refused in one line, or its null test_rouge_l comes with a
    warning naming why (never a silent null; the defaults, max_length 64 and 64 + 16
    tokens, are such a run)."""
    from fedtune.task.lm import generation_quality
    from fedtune.task.rows import Split

    try:
        cfg = load_config(None, [*LM, "model.max_length=64"])
    except ConfigError as exc:
        assert "generation" in str(exc) and "\n" not in str(exc)
        return
    assert cfg.task.generation_examples > 0
    assert cfg.task.generation_prompt_tokens + cfg.task.generation_new_tokens > 64
    ids = np.ones((4, 64), dtype=np.int32)  # four test texts, each the full 64 tokens
    split = Split(ids, np.ones_like(ids), ids)
    with caplog.at_level(logging.WARNING):
        scored = generation_quality(None, split, None, cfg)  # returns before any model use
    assert scored == {"rouge_l": None}
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("max_length" in m or "generation_prompt_tokens" in m for m in warned), (
        "test_rouge_l is null without a word: no warning and no refusal")


def test_a_switched_off_generation_metric_is_null_without_a_warning(caplog):
    """generation_examples = 0 asks for no ROUGE-L: nothing to warn about."""
    from fedtune.task.lm import generation_quality
    from fedtune.task.rows import Split

    cfg = load_config(None, [*LM, "model.max_length=16", "task.generation_examples=0"])
    ids = np.ones((2, 16), dtype=np.int32)
    with caplog.at_level(logging.WARNING):
        assert generation_quality(None, Split(ids, np.ones_like(ids), ids), None,
                                  cfg) == {"rouge_l": None}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_generation_metrics_work_is_bounded_as_a_whole():
    """The generation metric's total work (examples x new tokens x sequence length, no KV
    cache) has a bound that fits the machine; each key's bound alone lets 10,000 x 4,096
    new tokens on 4,096-token prompts through (~2.5e11 token forwards: years on 2 cores,
    where BOUNDS says "minutes, not hours")."""
    with pytest.raises(ConfigError, match=r"task\.generation_"):
        load_config(None, [*LM, "model.max_length=8192", "task.generation_examples=10000",
                           "task.generation_prompt_tokens=4096",
                           "task.generation_new_tokens=4096"])


def test_the_generation_work_bound_is_one_line_and_leaves_usual_settings_alone():
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*LM, "model.max_length=2048", "task.generation_examples=1000",
                           "task.generation_prompt_tokens=512",
                           "task.generation_new_tokens=128"])
    assert "\n" not in str(caught.value) and "task.generation_examples" in str(caught.value)
    # The defaults, and a metric switched off whatever its lengths, pass.
    load_config(None, [*LM, "model.max_length=128"])
    load_config(None, [*LM, "task.generation_examples=0", "task.generation_prompt_tokens=4096",
                       "task.generation_new_tokens=4096"])
    # A classifier ignores the [task] generation settings.
    load_config(None, ["task.generation_examples=10000", "task.generation_prompt_tokens=4096",
                       "task.generation_new_tokens=4096"])


def test_an_lm_run_with_no_predicted_test_token_ends_with_its_summary_line():
    """A causal-LM run whose texts hold no next token to predict (model.max_length = 1: every
    row is one token) is refused in one line naming model.max_length, or ends with its
    console line (test perplexity n/a), not a TypeError on final_accuracy=None after every
    round has run."""
    from fedtune.cli import quality_text
    from fedtune.task.kinds import task_kind

    try:
        load_config(None, [*LM, "model.max_length=1"])
    except ConfigError as exc:
        assert "model.max_length" in str(exc) and "\n" not in str(exc)
        return
    nothing = {"accuracy": None, "loss": None, "perplexity": None, "tokens": 0.0,
               "examples": 4.0}
    summary = task_kind("causal_lm").summary_fields(
        [{"round": 1, "val_accuracy": None, "val_loss": None, "val_perplexity": None}],
        {"test_loss": None, "val_loss": None}, nothing, 4)
    assert summary["test_perplexity"] is None and summary["final_accuracy"] is None
    quality_text(summary)


def test_an_lm_summary_without_a_test_perplexity_prints_n_a():
    """Test texts can still hold no scored token with max_length >= 2 (every text one token
    long): the final line says n/a instead of formatting a null accuracy. A classifier's
    line is unchanged."""
    from fedtune.cli import quality_text
    from fedtune.task.kinds import task_kind

    load_config(None, [*LM, "model.max_length=2"])  # the shortest text with a next token
    nothing = {"accuracy": None, "loss": None, "perplexity": None, "tokens": 0.0,
               "examples": 4.0}
    summary = task_kind("causal_lm").summary_fields(
        [{"round": 1, "val_accuracy": None, "val_loss": None, "val_perplexity": None}],
        {"test_loss": None, "val_loss": None}, nothing, 4)
    assert quality_text(summary).startswith("test perplexity n/a untuned -> n/a, ")
    classifier = {"final_accuracy": 0.9, "initial_accuracy": 0.5, "majority_accuracy": 0.6,
                  "best_val_accuracy": None}
    assert quality_text(classifier).startswith("final test accuracy 0.9000 (majority class")


def test_max_length_plus_the_soft_prompt_beyond_the_models_positions_is_one_line(
        lm_folders, tmp_path, monkeypatch):
    """A causal-LM run whose model.max_length + tuning.prompt.length exceeds the backbone's
    position limit (GPT-2 n_positions 64) is refused in one line naming model.max_length
    (as `fedtune predict` refuses a prompt past it), not an IndexError in the first
    forward."""
    from fedtune.task.kinds import task_kind
    from fedtune.task.task import get_task

    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = write_users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [f'model.backbone="{lm_folders["gpt2"]}"', "task.kind=causal_lm",
                             "data.corpus=hf", f'data.options={{path="json", data_files='
                             f'"{data}", test_fraction=0.25}}', "data.partition=natural",
                             "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
                             "model.max_length=64", "tuning.method=prompt",
                             "tuning.prompt.length=3"])
    try:
        task = get_task(cfg)
        model = task.new_model()
        figures = task_kind("causal_lm").evaluate(model, task.test, 8)
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        message = str(exc)
        assert "max_length" in message and "\n" not in message, (
            f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}")
        return
    assert figures["perplexity"] is not None


@pytest.mark.parametrize("family, sets, refused", [
    ("gpt2", ["model.max_length=61", "tuning.method=prompt", "tuning.prompt.length=3"], False),
    ("gpt2", ["model.max_length=62", "tuning.method=prompt", "tuning.prompt.length=3"], True),
    ("gpt2", ["model.max_length=65", "tuning.method=lora"], True),
    ("llama", ["model.max_length=64", "tuning.method=lora"], False),
    ("llama", ["model.max_length=80", "tuning.method=slash", "tuning.slash.size=8"], True),
])
def test_the_positions_a_row_takes_are_checked_against_the_backbones(family, sets, refused,
                                                                      lm_folders):
    """The refusal names model.max_length, the soft prompt's length and the model's limit
    (its config key), and comes as the backbone is loaded, before any text is tokenized."""
    from fedtune.task.kinds import task_kind
    from fedtune.task.task import _backbone

    cfg = load_config(None, [f'model.backbone="{lm_folders[family]}"', *LM, *sets])
    if not refused:
        backbone = _backbone(cfg)
        task_kind("causal_lm").check_backbone(backbone, cfg)
        return
    with pytest.raises(ConfigError) as caught:
        _backbone(cfg)
    message = str(caught.value)
    limit = "n_positions=64" if family == "gpt2" else "max_position_embeddings=64"
    assert "\n" not in message and "model.max_length=" in message and limit in message
    assert ("tuning.prompt.length=3" in message) == ("tuning.method=prompt" in sets)


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_slash_under_expanded_weights_is_refused_in_one_line(kind):
    """Opacus' expanded weights ('ew') cannot expand SLaSh's shared vector: every DP step
    would raise after Ray started; the config refuses it naming the key and the reason,
    for both task kinds, and keeps the other modes."""
    sets = ["tuning.method=slash", "privacy.sample.enabled=true"]
    if kind == "causal_lm":
        sets += LM
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*sets, "privacy.sample.grad_sample_mode=ew"])
    message = str(caught.value)
    assert "\n" not in message and "privacy.sample.grad_sample_mode='ew'" in message
    assert "tuning.method='slash'" in message
    for mode in ("hooks", "functorch"):
        load_config(None, [*sets, f"privacy.sample.grad_sample_mode={mode}"])
    # Without DP-SGD the mode is never used: nothing to refuse.
    load_config(None, ["tuning.method=slash", "privacy.sample.enabled=false",
                       "privacy.sample.grad_sample_mode=ew"])
    load_config(None, ["tuning.method=lora", "privacy.sample.enabled=true",
                       "privacy.sample.grad_sample_mode=ew"])


def test_an_accepted_lm_dp_mode_trains_slash(lm_folders):
    """A causal-LM config the loader accepts (SLaSh, DP-SGD, grad_sample_mode 'ew') trains
    under DP-SGD, or is refused in one line naming the key before any run."""
    from clients.train import local_train
    from fedtune.models import load_backbone
    from fedtune.privacy import DPHistory
    from fedtune.task.lm import lm_targets
    from fedtune.tuning import build_tuned_model

    folder = lm_folders["llama"]
    try:
        cfg = load_config(None, [f'model.backbone="{folder}"', "task.kind=causal_lm",
                                 "data.partition=iid", "tuning.method=slash",
                                 "tuning.slash.size=8", "privacy.sample.enabled=true",
                                 "privacy.sample.grad_sample_mode=ew", "train.batch_size=4",
                                 "train.local_steps=2", "privacy.reproducible_noise=true"])
    except ConfigError as exc:
        assert "grad_sample_mode" in str(exc) and "\n" not in str(exc)
        return
    backbone = load_backbone(folder, kind="causal_lm")
    model = build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    result = local_train(model, torch.utils.data.TensorDataset(ids, mask, labels), cfg,
                         DPHistory(), seed=0)
    assert result.steps == 2 and result.epsilon is not None

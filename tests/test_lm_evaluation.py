"""The causal-LM evaluation: what it scores (each text's own next tokens, whatever side the
backbone's tokenizer pads on), how much it holds at once (LOGITS_BUDGET, never passed by one
row) and what it writes (strict JSON however far the model diverged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.config import load_config
from fedtune.models.backbone import resolve_backbone_path
from fedtune.task import lm
from fedtune.task.kinds import round_quality, task_kind
from fedtune.task.rows import Split
from tests.lm_fixtures import CONFIGS, write_users


def test_an_evaluation_row_whose_logits_alone_pass_the_budget_is_refused(monkeypatch):
    """Invariant: a causal-LM evaluation forward never holds more than LOGITS_BUDGET logits:
    where one row alone (model.max_length x vocabulary) passes it, the run is refused in
    one line naming model.max_length, not evaluated past the bound (SmolLM2 at the allowed
    max_length 65,536 is 12.9 GB of logits per row against a 256 MiB budget)."""
    vocab, length = 50, 12

    class Tiny(torch.nn.Module):
        """A stand-in LM: uniform logits over `vocab` words (only shapes matter here)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = type("B", (), {"config": type("C", (), {"vocab_size": vocab})()})()
            self.seen: list[tuple[int, ...]] = []

        def forward(self, ids, mask):
            out = torch.zeros((*ids.shape, vocab))
            self.seen.append(tuple(out.shape))
            return out

    ids = np.ones((3, length), dtype=np.int64)
    split = Split(ids, np.ones_like(ids), ids)
    budget = vocab * length // 2  # less than one row's logits
    monkeypatch.setattr(lm, "LOGITS_BUDGET", budget)
    model = Tiny()
    try:
        lm.evaluate_lm(model, split, batch_size=8)
    except ValueError as exc:
        assert "max_length" in str(exc) and "\n" not in str(exc)
        return
    over = [s for s in model.seen if s[0] * s[1] * s[2] > budget]
    assert not over, f"forwards of {over[0]} logits against a budget of {budget}"


@pytest.fixture(scope="module")
def left_padding_llama(tmp_path_factory) -> str:
    """A user's decoder folder whose tokenizer pads on the left (as several chat models'
    tokenizer_config.json say)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    tokenizer.padding_side = "left"
    folder = tmp_path_factory.mktemp("decoder") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["llama"](len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_each_text_is_scored_on_its_own_next_tokens_whatever_the_padding_side(
        left_padding_llama, tmp_path, monkeypatch):
    """Invariant: a causal-LM text of n real tokens contributes exactly n - 1 next-token
    predictions (no prediction made at, or of a token after, a padded position), whatever
    side the backbone's tokenizer pads on."""
    from fedtune.task.task import get_task

    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = write_users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [f'model.backbone="{left_padding_llama}"', "task.kind=causal_lm",
                             "data.corpus=hf", f'data.options={{path="json", data_files='
                             f'"{data}", test_fraction=0.25}}', "data.partition=natural",
                             "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
                             "model.max_length=24", "tuning.method=lora"])
    task = get_task(cfg)
    mask = np.asarray(task.test.attention_mask)
    assert (mask.sum(axis=1) < mask.shape[1]).any()  # some texts are padded
    figures = task_kind("causal_lm").evaluate(task.new_model(), task.test, 8)
    expected = int(mask.sum() - len(mask))
    assert figures["tokens"] == expected, (
        f"{int(figures['tokens'])} predictions counted, {expected} real next tokens: "
        f"rows are padded {'left' if mask[:, 0].min() == 0 else 'right'}")


def _evaluation(loss: float) -> dict:
    return {"accuracy": None, "loss": loss, "perplexity": lm.perplexity(loss),
            "tokens": 100.0, "examples": 4.0}


def test_a_diverged_lm_rounds_and_summarys_perplexity_fields_are_strict_json():
    """Invariant: every perplexity field a causal-LM run writes is strict JSON (a number or
    null, never Infinity), however far the evaluated model diverged."""
    diverged = _evaluation(800.0)
    json.dumps(round_quality(diverged), allow_nan=False)
    history = [{"round": 1, **round_quality(diverged)}]
    summary = task_kind("causal_lm").summary_fields(
        history, {"test_loss": 800.0, "val_loss": 800.0}, diverged, 4)
    json.dumps(summary, allow_nan=False)


def test_a_backbone_whose_row_passes_the_budget_is_refused_when_the_task_is_built(
        lm_folders, tmp_path, monkeypatch):
    """The budget refusal comes when the task is built (server and clients), before any
    round is trained or charged, not at the first evaluation after round 1."""
    from fedtune.config import ConfigError
    from fedtune.task.task import get_task

    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    vocab = AutoModelForCausalLM.from_pretrained(lm_folders["gpt2"]).config.vocab_size
    monkeypatch.setattr(lm, "LOGITS_BUDGET", 10 * vocab)  # room for 10 positions a row
    data = write_users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [f'model.backbone="{lm_folders["gpt2"]}"', "task.kind=causal_lm",
                             "data.corpus=hf", f'data.options={{path="json", data_files='
                             f'"{data}", test_fraction=0.25}}', "data.partition=iid",
                             "data.num_clients=3", "train.clients_per_round=2",
                             "model.max_length=21", "tuning.method=lora"])
    with pytest.raises(ConfigError) as refused:
        get_task(cfg)
    message = str(refused.value)
    assert "model.max_length=21" in message and "model.max_length <= 10" in message
    assert "\n" not in message


def test_rows_padded_on_the_left_are_refused_and_the_lm_tokenizer_pads_right():
    """The targets' rule (t predicts t + 1 of the same text) holds for right-padded rows
    only: the causal-LM tokenizer is set to pad right, and left-padded rows are refused."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    tokenizer.padding_side = "left"
    lm.prepare_tokenizer(tokenizer)
    assert tokenizer.padding_side == "right"
    ids = np.array([[5, 6, 7, 0], [0, 5, 6, 7]])
    with pytest.raises(lm.LMDataError, match="row 1 .* padded on the right"):
        lm.lm_targets(ids, (ids != 0).astype(np.int8))
    right = np.array([[5, 6, 7, 0], [5, 0, 0, 0]])
    assert lm.lm_targets(right, (right != 0).astype(np.int8)).tolist() == [
        [5, 6, 7, lm.IGNORE], [5, lm.IGNORE, lm.IGNORE, lm.IGNORE]]


@pytest.mark.parametrize("fill, loss_kept", [(float("nan"), False), (1e4, True)])
def test_a_diverged_evaluation_writes_null_and_logs_why(fill, loss_kept, caplog):
    """A NaN loss is null with its perplexity; a finite loss past exp's range keeps its loss
    and has a null perplexity; both are logged as a diverged model, and the console's round
    line says so instead of crashing or claiming there is no validation split."""
    from fedtune.cli import round_line

    class Diverged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = type("B", (), {"config": type("C", (), {"vocab_size": 4})()})()

        def forward(self, ids, mask):
            out = torch.zeros((*ids.shape, 4))
            out[..., 0] = fill  # word 0 certain (or NaN): every other word costs ~fill nats
            return out

    ids = np.full((2, 6), 2, dtype=np.int64)
    with caplog.at_level("WARNING", logger="fedtune.task.lm"):
        figures = lm.evaluate_lm(Diverged(), Split(ids, np.ones_like(ids), ids), 8)
    assert figures["perplexity"] is None
    assert (figures["loss"] is not None) == loss_kept
    assert figures["loss"] is None or figures["loss"] > 709
    assert "diverged" in caplog.text
    rec = {"round": 1, **round_quality(figures), "epsilon_sample": None, "epsilon_user": None,
           "clients": 2, "bytes_up": 10, "wall_s": 1.0}
    json.dumps(rec, allow_nan=False)
    line = round_line(rec, load_config(None, ["task.kind=causal_lm", "data.partition=iid"]))
    assert "val ppl null (" in line and "see run.log" in line
    assert ("diverged" in line) == loss_kept and "no validation split" not in line

"""A causal-LM task (`[task] kind = "causal_lm"`) on tiny random Llama and GPT-2 decoders
saved to folders (the packaged MiniLM tokenizer stands in for theirs): the config refuses
what it cannot run, the loss is next-token cross entropy per sequence, perplexity is
token-weighted, Opacus' per-sample gradients of LoRA and of the soft prompt are each
example's own, DP-SGD accounts exactly as for a classifier, and the task builds users'
texts without labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import load_backbone
from fedtune.models.backbone import resolve_backbone_path
from fedtune.privacy import DPHistory
from fedtune.task.lm import (
    IGNORE,
    LMDataError,
    NextTokenLoss,
    evaluate_lm,
    lm_targets,
    prepare_tokenizer,
)
from fedtune.task.rows import Split
from fedtune.tuning import build_tuned_model
from tests.lm_fixtures import (
    CONFIGS,  # noqa: F401 (test_lm_e2e, test_lm_split import it here)
    LM,
    write_users,
)


def _cfg(folder: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', *LM, "train.batch_size=4",
                              "train.local_steps=2", "tuning.prompt.length=3",
                              "tuning.slash.size=8", "privacy.reproducible_noise=true", *sets])


def _model(folder: str, method: str):
    cfg = _cfg(folder, f"tuning.method={method}")
    backbone = load_backbone(folder, kind="causal_lm")
    return build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm"), backbone, cfg


def _batch(n: int = 4, t: int = 10, seed: int = 0, padded: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i in range(n):
            mask[i, t - 2 * i:] = 0 if i else 1
        ids[mask == 0] = 0
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    return ids, mask, labels


# --- config --------------------------------------------------------------------------------

def test_the_default_task_is_classification_and_an_unknown_kind_is_one_line():
    assert load_config(None).task.kind == "classification"
    with pytest.raises(ConfigError, match=r"^task.kind='regression' is not one of: "
                       r"causal_lm, classification$"):
        load_config(None, ["task.kind=regression"])


@pytest.mark.parametrize("sets, key", [
    (["split.enabled=true", "split.local_loss_fraction=0.5"], "split.local_loss_fraction"),
    (['plugins=[{name="el2n_pruning"}]'], "plugins"),
    (["tuning.method=bitfit"], "tuning.method='bitfit'"),
    (["tuning.method=head"], "tuning.method='head'"),
    (["data.partition=dirichlet"], "data.partition='dirichlet'"),
    (['data.labels=["a", "b"]'], "data.labels"),
    (["tuning.domain_head=true"], "tuning.domain_head"),
    (["tuning.prompt.layer=1"], "tuning.prompt.layer"),
    (["privacy.sample.grad_sample_mode=ghost"], "grad_sample_mode='ghost'"),
])
def test_a_causal_lm_run_refuses_what_it_cannot_do_yet_in_one_line(sets, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*LM, *sets])
    message = str(info.value)
    assert key in message and "\n" not in message


def test_keep_unattributed_is_refused_for_a_classifier():
    with pytest.raises(ConfigError, match="task.keep_unattributed=true applies to"):
        load_config(None, ["task.keep_unattributed=true"])
    assert load_config(None, [*LM, "task.keep_unattributed=true"]).task.keep_unattributed


# --- loss and perplexity -------------------------------------------------------------------

def test_targets_are_the_ids_with_padding_ignored():
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert lm_targets(ids, mask).tolist() == [[5, 6, 7, IGNORE], [8, 9, IGNORE, IGNORE]]


def test_the_loss_ignores_padding_and_averages_each_sequence_then_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, IGNORE, IGNORE, IGNORE]])
    loss = NextTokenLoss()(logits, labels)
    # Sequence 0 predicts 4 tokens, sequence 1 one: each sequence's mean, then the mean.
    nll = torch.nn.functional.cross_entropy
    first = nll(logits[0, :4], labels[0, 1:])
    second = nll(logits[1, :1], labels[1, 1:2])
    assert loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-6)
    # Not the token mean (which would weigh sequence 0 four times as much).
    assert loss.item() != pytest.approx(((4 * first + second) / 5).item(), rel=1e-3)
    # Whatever the logits at padded positions, the loss is the same.
    changed = logits.clone()
    changed[1, 2:] = 100.0
    assert NextTokenLoss()(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loss_equals_hugging_faces_own_on_an_unpadded_batch(family, lm_folders):
    model, backbone, _ = _model(lm_folders[family], "lora")
    ids, mask, labels = _batch(padded=False)
    ours = NextTokenLoss()(model(ids, mask), labels)
    theirs = backbone.model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_perplexity_is_token_weighted(lm_folders):
    model, _, _ = _model(lm_folders["llama"], "lora")
    ids, mask, labels = _batch(n=3, t=12)
    split = Split(ids.numpy(), mask.numpy(), labels.numpy())
    got = evaluate_lm(model, split, batch_size=2)
    with torch.no_grad():
        logits = model(ids, mask)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                            reduction="sum")
    tokens = int((labels[:, 1:] != IGNORE).sum())
    assert got["tokens"] == tokens and got["accuracy"] is None
    assert got["loss"] == pytest.approx(nll.item() / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll.item() / tokens), rel=1e-5)


class _Fixed(torch.nn.Module):
    """A model whose logits are given: a near-perfect long row and a uniform short one."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, ids, mask):
        return self.logits[:ids.shape[0]]


def test_a_long_message_weighs_by_its_tokens_in_perplexity():
    vocab = 4
    ids = torch.tensor([[1, 2, 3, 1, 2, 3], [1, 2, 0, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [2]])).long()
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    logits = torch.zeros(2, 6, vocab)
    logits[0, torch.arange(5), ids[0, 1:]] = 20.0  # row 0: 5 tokens, NLL ~0 each
    got = evaluate_lm(_Fixed(logits), Split(ids.numpy(), mask.numpy(), labels.numpy()), 8)
    # Row 1 predicts 1 token at NLL ln 4: 1 x ln 4 over 6 tokens, not the rows' mean ln4 / 2.
    assert got["tokens"] == 6
    assert got["loss"] == pytest.approx(math.log(vocab) / 6, rel=1e-3)
    assert NextTokenLoss()(logits, labels).item() == pytest.approx(math.log(vocab) / 2,
                                                                   rel=1e-3)


def test_generation_quality_is_the_continuation_rouge_of_the_texts_long_enough(lm_folders):
    """The final model's `rouge_l`: `continuation_rouge` of the split's unpadded texts with the
    [task] settings; None when the texts cannot be that long (model.max_length) or when it
    is switched off; the settings are bounded."""
    pytest.importorskip("rouge_score")
    from fedtune.task.generation import continuation_rouge
    from fedtune.task.lm import generation_quality

    model, backbone, _ = _model(lm_folders["llama"], "lora")
    ids, mask, labels = _batch(n=4, t=10)  # rows of 10, 8, 6 and 4 real tokens
    split = Split(ids.numpy(), mask.numpy(), labels.numpy())
    sets = ["task.generation_prompt_tokens=4", "task.generation_new_tokens=3",
            "task.generation_examples=2"]
    cfg = _cfg(lm_folders["llama"], *sets)
    got = generation_quality(model, split, backbone.tokenizer, cfg)
    rows = [r[m.astype(bool)].tolist() for r, m in zip(ids.numpy(), mask.numpy(), strict=True)]
    with torch.no_grad():
        want = continuation_rouge(model, backbone.tokenizer, rows, 4, 3, 2, 4)
    assert want["examples"] >= 1 and got == {"rouge_l": want["rouge_l"]}
    assert got["rouge_l"] is not None
    for off in (["task.generation_prompt_tokens=8"], ["task.generation_examples=0"]):
        cfg = _cfg(lm_folders["llama"], *sets, *off)
        assert generation_quality(model, split, backbone.tokenizer, cfg) == {"rouge_l": None}
    with pytest.raises(ConfigError, match=r"task.generation_new_tokens must be in \[1, 4096\]"):
        _cfg(lm_folders["llama"], "task.generation_new_tokens=5000")


# --- models --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prompt", "slash"])
def test_the_models_return_next_token_logits_and_federate_only_their_tensors(
        family, method, lm_folders):
    model, backbone, _ = _model(lm_folders[family], method)
    ids, mask, _ = _batch()
    logits = model(ids, mask)
    assert logits.shape == (4, 10, backbone.model.config.vocab_size)
    names = list(model.trainable_state())
    prefix = {"prompt": "prompt.", "slash": "z."}
    assert names and all(("lora_" in n) if method == "lora" else n.startswith(prefix[method])
                         for n in names)
    # The process-wide backbone stays frozen and unmodified.
    assert not any(p.requires_grad for p in backbone.model.parameters())
    if method == "prompt":
        # The untrained prompt shifts the positions, nothing else: the text's own logits.
        assert model.prompt.embedding.num_embeddings == 3


def _per_example_grads(model, ids, mask, labels):
    out = []
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        NextTokenLoss()(model(ids[i:i + 1], mask[i:i + 1]), labels[i:i + 1]).backward()
        out.append({n: p.grad.clone() for n, p in model.trainable_state().items()})
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family, mode", [("llama", "hooks"), ("gpt2", "hooks"),
                                          ("llama", "functorch")])
@pytest.mark.parametrize("method", ["lora", "prompt", "slash"])
def test_opacus_per_sample_gradients_are_each_messages_own(family, mode, method, lm_folders):
    """On a padded batch of 3: each per-sample gradient equals the plain backward of that
    message alone (its loss is its own mean, whatever the others)."""
    from opacus import GradSampleModule

    model, _, _ = _model(lm_folders[family], method)
    model.train()
    ids, mask, labels = _batch(n=3)
    with torch.no_grad():  # LoRA's B and SLaSh's z start at zero: give them a value
        for name, p in model.trainable_state().items():
            if "lora_B" in name or name.startswith("z."):
                p.normal_(0, 0.1)
    expected = _per_example_grads(model, ids, mask, labels)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                               force_functorch=mode == "functorch")
    NextTokenLoss()(wrapped(ids, mask), labels).backward()
    for name, p in model.trainable_state().items():
        assert p.grad_sample.shape[0] == 3
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4,
                                       atol=1e-6)
    wrapped.to_standard_module()


def test_dp_sgd_runs_and_accounts_as_for_a_classifier(lm_folders):
    """Same plan, same accountant: a causal-LM client's DP-SGD release (sigma, q, steps)
    and epsilon equal a classifier's on as many examples."""
    folder = lm_folders["llama"]
    cfg = _cfg(folder, "tuning.method=lora")
    model, _, _ = _model(folder, "lora")
    ids, mask, labels = _batch(n=12)
    data = torch.utils.data.TensorDataset(ids, mask, labels)
    before = {n: p.detach().clone() for n, p in model.trainable_state().items()}
    lm = local_train(model, data, cfg, DPHistory(), seed=0)
    assert lm.steps == 2 and lm.epsilon is not None and math.isfinite(lm.loss)
    assert any(not torch.equal(before[n], p) for n, p in model.trainable_state().items())
    classifier_cfg = load_config(None, [f'model.backbone="{folder}"', "tuning.method=lora",
                                        "train.batch_size=4", "train.local_steps=2",
                                        "privacy.reproducible_noise=true"])
    classifier = build_tuned_model(load_backbone(folder), classifier_cfg.tuning, 2, seed=0)
    cls_data = torch.utils.data.TensorDataset(ids, mask, torch.randint(0, 2, (12,)))
    cls = local_train(classifier, cls_data, classifier_cfg, DPHistory(), seed=0)
    assert (lm.noise_multiplier, lm.sample_rate, lm.steps, lm.epsilon) == (
        cls.noise_multiplier, cls.sample_rate, cls.steps, cls.epsilon)


# --- data ----------------------------------------------------------------------------------

def test_a_tokenizer_without_pad_pads_with_eos_and_one_without_either_is_refused():
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    tokenizer.pad_token = None
    with pytest.raises(LMDataError, match="neither a pad nor an end-of-sequence token"):
        prepare_tokenizer(tokenizer)
    tokenizer.eos_token = "[SEP]"
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "[SEP]"


def test_the_task_builds_users_texts_without_labels(lm_folders, tmp_path):
    from fedtune.task.task import get_task, task_key

    data = write_users(tmp_path / "mail.jsonl")
    cfg = load_config(None, [f'model.backbone="{lm_folders["gpt2"]}"', "task.kind=causal_lm",
                             "data.corpus=hf", f'data.options={{path="json", data_files='
                             f'"{data}", test_fraction=0.25}}', "data.partition=natural",
                             "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
                             "model.max_length=16", "tuning.method=lora"])
    task = get_task(cfg)
    assert task.label_names == () and task.train.labels.shape == task.train.input_ids.shape
    padded = np.asarray(task.train.attention_mask) == 0
    assert (np.asarray(task.train.labels)[padded] == IGNORE).all()
    assert (np.asarray(task.train.labels)[~padded] ==
            np.asarray(task.train.input_ids)[~padded]).all()
    # Three users, three clients; the unattributed rows are dropped; validation is carved.
    assert len(task.partitions) == 3 and task.validation is not None
    rows = sum(len(p) for p in task.partitions) + len(task.validation) + len(task.test)
    assert rows == 60
    classifier = load_config(None, [f'model.backbone="{lm_folders["gpt2"]}"'])
    assert task_key(cfg) != task_key(classifier)
    # A second build in another process reads the task cache: the same arrays.
    from fedtune.task.task import _build_task

    _build_task.cache_clear()
    again = get_task(cfg)
    assert np.array_equal(np.asarray(again.train.labels), np.asarray(task.train.labels))
    assert again.label_names == ()


def test_preflight_needs_no_label_column_for_a_causal_lm_run(tmp_path, lm_folders):
    from fedtune.run.preflight import preflight

    data = write_users(tmp_path / "mail.jsonl")
    sets = [f'model.backbone="{lm_folders["llama"]}"', "data.corpus=hf",
            f'data.options={{path="json", data_files="{data}"}}', "data.partition=natural",
            "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
            "tuning.method=lora"]
    preflight(load_config(None, ["task.kind=causal_lm", *sets]))
    with pytest.raises(ConfigError, match="has no column label_field='label'"):
        preflight(load_config(None, sets))


def test_an_evaluation_batch_is_cut_to_bound_the_logits_with_the_same_figures(
        lm_folders, monkeypatch):
    import fedtune.task.lm as lm_module

    model, _, _ = _model(lm_folders["gpt2"], "lora")
    ids, mask, labels = _batch(n=5, t=12)
    split = Split(ids.numpy(), mask.numpy(), labels.numpy())
    whole = evaluate_lm(model, split, batch_size=8)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda i, m: calls.append(len(i)) or forward(i, m))
    # Room for the logits of two rows at a time.
    monkeypatch.setattr(lm_module, "LOGITS_BUDGET", 2 * 12 * model.backbone.config.vocab_size)
    cut = evaluate_lm(model, split, batch_size=8)
    assert calls == [2, 2, 1]
    assert cut["tokens"] == whole["tokens"]
    assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_the_console_shows_perplexity_untuned_to_final_and_the_epsilons():
    from fedtune.cli import round_line, summary_line

    cfg = load_config(None, [*LM, "tuning.method=lora"])
    summary = {"wall_s": 12.0, "epsilon_sample": 7.5, "epsilon_user": None,
               "total_bytes_up": 1000, "trainable_params": 4096, "final_accuracy": None,
               "test_perplexity": 41.234, "initial_test_perplexity": 67.7,
               "final_val_perplexity": 42.0, "best_val_perplexity": 41.9, "best_round": 2}
    line = summary_line(summary, "/tmp/run", cfg)
    assert "test perplexity 67.70 untuned -> 41.23" in line
    assert "validation perplexity 42.00 (best 41.90 at round 2)" in line
    assert "epsilon_sample 7.5" in line and "accuracy" not in line
    record = {"round": 1, "val_accuracy": None, "val_loss": math.log(50.0),
              "val_perplexity": 50.0, "epsilon_sample": 3.0, "epsilon_user": None,
              "clients": 2, "bytes_up": 10, "wall_s": 1.0}
    assert "val ppl 50.00" in round_line(record, cfg)


# --- the whole round, in process -----------------------------------------------------------

def _users_cfg(folder: str, data, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', "task.kind=causal_lm",
                              "data.corpus=hf", f'data.options={{path="json", data_files='
                              f'"{data}", test_fraction=0.25}}', "data.partition=natural",
                              "data.by=user", "data.num_clients=3", "train.clients_per_round=2",
                              "train.rounds=2", "train.local_steps=2", "train.batch_size=4",
                              "model.max_length=16", "train.round_timeout_s=60",
                              "tuning.prompt.length=3", *sets])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method, level", [("lora", "sample"), ("prompt", "user")])
def test_a_round_loop_trains_users_texts_and_writes_perplexity(method, level, lm_folders,
                                                               tmp_path, monkeypatch):
    """The real ServerApp round loop driving the real ClientApp handlers (no Ray): DP-SGD
    with a message as the unit, or user-level DP with a user as the unit; validation
    perplexity every round, test and untuned perplexities at the end, nulls for what a
    classifier reports."""
    from inline_grid import inline_run

    data = write_users(tmp_path / "mail.jsonl")
    privacy = (["privacy.sample.enabled=true"] if level == "sample" else
               ["privacy.sample.enabled=false", "privacy.user.enabled=true",
                "privacy.user.clip_norm=1.0",
                "train.clients_per_round=3"])
    cfg = _users_cfg(lm_folders["llama"], data, f"tuning.method={method}", *privacy)
    summary, _, _ = inline_run(cfg, tmp_path / "run", monkeypatch)
    rounds = [json.loads(x) for x in (tmp_path / "run/rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for record in rounds:
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
        assert record["val_accuracy"] is None and record["majority_val_accuracy"] is None
        epsilon = record[f"epsilon_{level}"]
        assert epsilon is not None and epsilon > 0
    saved = json.loads((tmp_path / "run/summary.json").read_text())
    assert saved == summary
    assert saved["final_accuracy"] is None and saved["majority_accuracy"] is None
    assert saved["test_perplexity"] == pytest.approx(math.exp(saved["test_loss"]))
    assert saved["initial_test_perplexity"] > 1 and saved["initial_val_perplexity"] > 1
    best = min(rounds, key=lambda r: r["val_perplexity"])
    assert (saved["best_round"], saved["best_val_perplexity"]) == (best["round"],
                                                                    best["val_perplexity"])
    assert saved["method"] == method and saved["trainable_params"] > 0

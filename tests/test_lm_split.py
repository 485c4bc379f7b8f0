"""Split mode (SFPrompt) on a causal LM: on tiny random Llama and GPT-2 decoders, the head
(embeddings + prompt + first blocks), the body (middle blocks) and the tail (last blocks +
final norm + LM head) compose to the unsplit model's logits and loss, padding included; each
part is causal; a split training step changes only the prompt and gives the unsplit deltas;
smashed DP sends rows noised at the stated scale; and the statement says what an LM's split
traffic is (per-token activations of every text, which is its own label)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import TensorDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients import split as split_client
from clients.train import local_train
from fedtune.config import ConfigError, load_config
from fedtune.models import load_backbone
from fedtune.models.backbone import resolve_backbone_path
from fedtune.privacy import DPHistory
from fedtune.split import InProcessBody
from fedtune.split.cut import SplitBackbone, SplitError
from fedtune.split.disclosure import split_disclosure
from fedtune.split.flops import probing
from fedtune.split.model import SplitCausalLMPrompt, split_view_of
from fedtune.task.lm import NextTokenLoss, lm_targets
from fedtune.tuning import build_tuned_model
from tests.test_causal_lm import CONFIGS, write_users

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 3  # head, body and tail each get a block at cut 1 with one tail layer
LM = ["task.kind=causal_lm", "data.partition=iid", "tuning.method=prompt",
      "tuning.prompt.length=3", "train.batch_size=4", "privacy.reproducible_noise=true"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """3-layer random Llama and GPT-2 CausalLM folders (the packaged MiniLM tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    root = tmp_path_factory.mktemp("lm-split")
    out = {}
    for family, make in CONFIGS.items():
        config = make(len(tokenizer))
        config.num_hidden_layers = LAYERS  # GPT-2's n_layer is the same attribute
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


def _cfg(folder: str, *sets: str):
    return load_config(None, [f'model.backbone="{folder}"', *LM, "split.enabled=true", *sets])


def _batch(n: int = 4, t: int = 10, seed: int = 0):
    """Right-padded texts of different lengths (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):
        mask[i, t - 2 * i:] = 0
    ids[mask == 0] = 0
    labels = torch.from_numpy(lm_targets(ids.numpy(), mask.numpy())).long()
    return ids, mask, labels


def _prompt_model(folder: str, cfg):
    backbone = load_backbone(folder, kind="causal_lm")
    return build_tuned_model(backbone, cfg.tuning, 0, seed=0, kind="causal_lm"), backbone


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


# --------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_split_logits_and_loss_equal_the_unsplit_models_padding_included(family, folders):
    cfg = _cfg(folders[family])
    model, backbone = _prompt_model(folders[family], cfg)
    with torch.no_grad():  # a trained-looking prompt, not the vocabulary rows it starts as
        model.prompt.embedding.weight.add_(torch.randn_like(model.prompt.embedding.weight))
    ids, mask, labels = _batch()
    with torch.no_grad():
        expected = model(ids, mask)
        loss = NextTokenLoss()(expected, labels)
        for cut in range(LAYERS):
            for tail in range(LAYERS - cut):
                view = split_view_of(model, SplitBackbone(backbone.model, cut, tail))
                assert isinstance(view, SplitCausalLMPrompt)
                got = view(ids, mask)
                assert got.shape == (4, 10, backbone.model.config.vocab_size)
                # Every position, the padded ones too: each part got the same mask.
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                assert NextTokenLoss()(got, labels).item() == pytest.approx(loss.item(),
                                                                            rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_body_and_tail_are_each_causal(family, folders):
    """Changing the states at position j changes no earlier position's output in any part,
    with the real (padded) mask and with the all-ones mask smashed DP sends the body."""
    split = SplitBackbone(load_backbone(folders[family], kind="causal_lm").model, 1, 1)
    ids, mask, _ = _batch()
    embeds = split.model.get_input_embeddings()(ids)
    hidden = split.embed(embeds, mask)
    j = 4
    for part in (split.head, split.body, split.tail):
        for used in (mask, torch.ones_like(mask)):
            changed = hidden.clone()
            changed[:, j] += 1.0
            with torch.no_grad():
                before, after = part(hidden, used), part(changed, used)
            torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=0)
            assert not torch.allclose(after[0, j:], before[0, j:])
        with torch.no_grad():
            hidden = part(hidden, mask) if part is not split.tail else hidden


def test_a_classifiers_tail_layers_run_on_the_client_too(folders):
    """split.tail_layers is the cut's, not the LM's: a decoder classifier's prompt model
    with its last block and final norm in the tail still computes its unsplit logits."""
    from fedtune.split import SplitPromptModel

    cfg = load_config(None, [f'model.backbone="{folders["gpt2"]}"', "tuning.prompt.length=3",
                             "split.enabled=true", "split.tail_layers=1"])
    backbone = load_backbone(folders["gpt2"])
    model = build_tuned_model(backbone, cfg.tuning, 2, seed=0)
    with torch.no_grad():  # the head starts at zero: every model would agree
        for p in model.head.parameters():
            p.normal_()
    view = split_view_of(model, SplitBackbone(backbone.model, 1, 1))
    assert isinstance(view, SplitPromptModel) and view.split.norm_in_tail
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(view(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-6)


def test_the_tail_ends_in_the_lm_head_and_the_norm_runs_on_the_client(folders):
    lm = load_backbone(folders["llama"], kind="causal_lm").model
    split = SplitBackbone(lm, 1)
    assert split.output_head is lm.get_output_embeddings() and split.norm_in_tail
    # A classifier's backbone (no output head, no tail layers) keeps its norm in the body.
    assert not SplitBackbone(load_backbone(folders["llama"]).model, 1).norm_in_tail
    with pytest.raises(SplitError, match=r"^split.cut_layer=2 is out of range for this "
                                         r"backbone \(3 layers, the last 1 in the tail\): "
                                         r"allowed 0..1"):
        SplitBackbone(lm, 2, 1)
    with pytest.raises(SplitError, match=r"^split.tail_layers=3 is out of range"):
        SplitBackbone(lm, 0, 3)


# --------------------------------------------------------------------------- training


def _train(folder: str, cfg, data, split: bool):
    model, _ = _prompt_model(folder, cfg)
    step = None
    trained = model
    if split:
        trained = split_client.split_view(model, None, cfg, _context())
        step = split_client.split_step(trained, cfg, cfg.train.local_steps, n=len(data),
                                       seed=5)
    result = local_train(trained, data, cfg, DPHistory(), seed=5, step=step)
    return model, result


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dp", [False, True])
def test_a_split_step_trains_only_the_prompt_and_gives_the_unsplit_deltas(family, dp,
                                                                         folders):
    folder = folders[family]
    cfg = _cfg(folder, "train.local_steps=2", "split.cut_layer=1", "split.tail_layers=1",
               f"privacy.sample.enabled={str(dp).lower()}", "train.lr=0.5")
    ids, mask, labels = _batch(n=12, seed=1)
    data = TensorDataset(ids, mask, labels)
    backbone = load_backbone(folder, kind="causal_lm")
    frozen = {n: t.clone() for n, t in backbone.model.state_dict().items()}
    start = _prompt_model(folder, cfg)[0].trainable_state()["prompt.embedding.weight"].clone()
    plain, expected = _train(folder, cfg, data, split=False)
    model, got = _train(folder, cfg, data, split=True)
    assert list(model.trainable_state()) == ["prompt.embedding.weight"]
    trained = model.trainable_state()["prompt.embedding.weight"]
    assert not torch.equal(trained, start)  # it did train
    torch.testing.assert_close(trained, plain.trainable_state()["prompt.embedding.weight"],
                               rtol=1e-5, atol=1e-6)
    assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    assert got.examples_seen == expected.examples_seen  # texts, not tokens
    assert got.extras["split-examples"] == got.examples_seen
    assert (got.epsilon is None) == (not dp) and got.epsilon == expected.epsilon
    # The process-wide backbone (the body's and the tail's weights) did not move.
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    # Client + server FLOPs add up to the unsplit client's (the LM head is the client's).
    assert got.flops + got.extras["server-flops"] == pytest.approx(expected.flops, rel=0.01)
    assert 0 < got.extras["client-flops-per-example"] < got.extras[
        "full-model-flops-per-example"]


class _Recorder:
    """A body that keeps what it receives (but the FLOP probe: synthetic, one row)."""

    def __init__(self, body):
        self.body, self.split, self.sent = body, body.split, []

    def forward(self, smashed, attention_mask):
        if not probing():
            self.sent.append(("smashed", smashed.clone(), attention_mask.clone()))
        return self.body.forward(smashed, attention_mask)

    def backward(self, grad_output):
        if not probing():
            self.sent.append(("grad", grad_output.clone(), None))
        return self.body.backward(grad_output)

    def evaluate(self, smashed, attention_mask):
        return self.body.evaluate(smashed, attention_mask)


def test_smashed_dp_sends_fixed_rows_noised_at_the_stated_scale(folders, monkeypatch):
    """sigma = 2, C_a = 3, C_g = 0.5: rows no text took hold pure noise of std sigma * C
    (the scale the statement gives), every row has all positions, the mask is all ones,
    and each split step is a privacy event at the planned joint multiplier."""
    folder = folders["gpt2"]
    cfg = _cfg(folder, "train.local_steps=3", "split.smashed_dp.enabled=true",
               "split.smashed_dp.noise_multiplier=2.0",
               "split.smashed_dp.activation_clip_norm=3.0",
               "split.smashed_dp.gradient_clip_norm=0.5")
    model, backbone = _prompt_model(folder, cfg)
    recorder = _Recorder(InProcessBody(SplitBackbone(backbone.model, cfg.split.cut_layer)))
    monkeypatch.setattr(split_client, "config_body", lambda _cfg: recorder)
    view = split_client.split_view(model, None, cfg, _context())
    ids, mask, labels = _batch(n=16, seed=2)
    data = TensorDataset(ids, mask, labels)
    step = split_client.split_step(view, cfg, 3, n=len(data), seed=7)
    result = local_train(view, data, cfg, DPHistory(), seed=5, step=step)
    statement = split_disclosure(cfg)
    assert statement["smashed_dp"]["noise_multiplier"] == 2.0
    slots = statement["smashed_dp"]["rows_per_split_step"]
    smashed = [(t, m) for kind, t, m in recorder.sent if kind == "smashed"]
    grads = [t for kind, t, _ in recorder.sent if kind == "grad"]
    assert len(smashed) == len(grads) == 3 == result.steps
    width = 10 + 3  # every position of a text (tokens + prompt) as one row
    for (rows, sent_mask), grad in zip(smashed, grads, strict=True):
        assert rows.shape == grad.shape == (slots, width, backbone.hidden_size)
        assert torch.equal(sent_mask, torch.ones(slots, width, dtype=sent_mask.dtype))
    # The last step's slots are known to the client (and the test), not the server.
    empty = torch.ones(slots, dtype=torch.bool)
    empty[step.last_slots] = False
    assert empty.sum() >= slots - 2 * 4  # most of the slots carry no text
    noise = smashed[-1][0][empty]
    assert noise.std().item() == pytest.approx(2.0 * 3.0, rel=0.05)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.1)
    assert grads[-1][empty].std().item() == pytest.approx(2.0 * 0.5, rel=0.05)
    assert step.privacy_events() == [(step.smashed.joint_multiplier, step.smashed.sample_rate,
                                      3)]


# --------------------------------------------------------------------------- config, statement


def test_an_lm_split_run_is_accepted_and_refuses_local_loss_in_one_line(folders):
    cfg = _cfg(folders["llama"], "split.tail_layers=1")
    assert cfg.split.enabled and cfg.split.tail_layers == 1
    with pytest.raises(ConfigError) as info:
        _cfg(folders["llama"], "split.local_loss_fraction=0.5")
    assert "split.local_loss_fraction" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="split.tail_layers"):
        _cfg(folders["llama"], "split.tail_layers=-1")


def test_the_statement_says_every_texts_per_token_activations_go_up(folders):
    clear = split_disclosure(_cfg(folders["llama"]))
    assert clear["epsilon_sample_covers"] == "deltas only; smashed data in clear"
    seen = " | ".join(clear["server_sees_in_clear"])
    assert "per-token cut-layer activations of every trained example" in seen
    assert "every position of every text" in seen and "each next token" in seen
    assert "each text's length" in seen
    protected = split_disclosure(_cfg(folders["llama"], "split.smashed_dp.enabled=true"))
    assert not any("activations" in s for s in protected["server_sees_in_clear"])
    assert protected["epsilon_sample_covers"].endswith(
        "clipped and noised per text (the rows of all its positions, clipped together))")
    classifier = split_disclosure(load_config(None, ["split.enabled=true"]))
    assert any("label against the tail" in s for s in classifier["server_sees_in_clear"])


def test_the_split_audit_refuses_an_lm_run_in_one_line(folders, tmp_path):
    from fedtune.audit.split_attack import audit_run

    (tmp_path / "config.toml").write_text(_cfg(folders["llama"]).to_toml())
    with pytest.raises(ValueError, match=r"attacks a classifier's split run; "
                                         r"task.kind='causal_lm' is not built for it yet$"):
        audit_run(tmp_path)


# --------------------------------------------------------------------------- a real round


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("smashed", [False, True])
def test_what_an_lm_split_round_sends_is_what_its_statement_says(folders, tmp_path,
                                                                 monkeypatch, smashed):
    """THREATS.md class 3 for a causal LM: a real round (the ServerApp's loop driving the
    ClientApp handlers in process) records every tensor the body receives and every key a
    reply carries; both sets are the statement's, and the ledger has perplexity and the
    split statement."""
    from inline_grid import inline_run

    from fedtune.wire.fields import expected_keys

    data = write_users(tmp_path / "mail.jsonl", users=("alice", "bob"))
    sets = [f'model.backbone="{folders["llama"]}"', "task.kind=causal_lm", "data.corpus=hf",
            f'data.options={{path="json", data_files="{data}", test_fraction=0.25}}',
            "data.partition=natural", "data.by=user", "data.num_clients=2",
            "train.clients_per_round=2", "train.rounds=1", "train.local_steps=2",
            "train.batch_size=4", "model.max_length=16", "tuning.method=prompt",
            "tuning.prompt.length=2", "split.enabled=true", "split.tail_layers=1",
            "train.eval_max_examples=8", "train.round_timeout_s=120",
            f'runtime.cache_dir="{tmp_path / "cache"}"']
    if smashed:
        sets += ["split.smashed_dp.enabled=true", "split.smashed_dp.noise_multiplier=1.0",
                 "privacy.sample.noise_multiplier=1.0", "privacy.sample.target_epsilon=50"]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    summary, grid, body = inline_run(cfg, out, monkeypatch)
    expected = expected_keys(cfg)
    assert body.keys == expected["split body"]
    assert grid.keys["train reply"] == expected["train reply"]
    record = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
    assert record["clients"] == 2 and not record["rejected"]
    # Under DP the split figures (real-row counts) stay on the client, as a classifier's.
    assert "smashed_bytes_up" not in record
    assert "split figures" in record["privacy_in_clear"]["withheld"]
    sent = [t for k, t in body.tensors if k == "body.forward.activations"]
    assert sent and all(t.shape[1] == 16 + 2 for t in sent)  # every position of a text
    statement = record["split_privacy"]
    if smashed:
        assert statement["smashed_dp"]["noise_multiplier"] == 1.0
        masks = [t for k, t in body.tensors if k == "body.forward.attention_mask"]
        assert all(bool((m == 1).all()) for m in masks)
    else:
        assert statement["smashed_dp"] is None
        assert any("per-token" in s for s in statement["server_sees_in_clear"])
    assert summary["split_privacy"] == statement and summary["test_perplexity"] > 0


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.long  # the README's command keeps one LM run (test_lm_e2e); CI runs these after it
def test_fedtune_run_of_a_causal_lm_in_split_mode(folders, tmp_path):
    """Two users, one round, 16 tokens, split at cut 1 with one tail layer, DP-SGD on and
    the smashed data in clear: the ledger has perplexity and the split figures, and the
    summary states that the server saw every text's per-token activations."""
    data = write_users(tmp_path / "mail.jsonl", users=("alice", "bob"))
    sets = [f'model.backbone="{folders["llama"]}"', "task.kind=causal_lm", "data.corpus=hf",
            f'data.options={{path="json", data_files="{data}", test_fraction=0.25}}',
            "data.partition=natural", "data.by=user", "data.num_clients=2",
            "train.clients_per_round=2", "train.rounds=1", "train.local_steps=2",
            "train.batch_size=4", "model.max_length=16", "tuning.method=prompt",
            "tuning.prompt.length=2", "split.enabled=true", "split.cut_layer=1",
            "split.tail_layers=1", "privacy.disclose_counts=true", "simulation.num_cpus=1",
            "name=lm-split"]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fedtune.cli", "run", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1
    record = rounds[0]
    assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
    assert record["val_accuracy"] is None and record["clients"] == 2
    # 2 steps a client; an empty Poisson batch (secret, so not seeded here) sends nothing.
    assert 0 < record["split_steps"] <= 2 * 2 and record["smashed_bytes_up"] > 0
    assert 0 < record["client_flops_fraction"] < 1 and record["server_flops"] > 0
    assert record["split_privacy"]["epsilon_sample_covers"] == (
        "deltas only; smashed data in clear")
    summary = json.loads((out / "summary.json").read_text())
    leak = " | ".join(summary["split_privacy"]["server_sees_in_clear"])
    assert "per-token cut-layer activations" in leak and "each next token" in leak
    assert summary["total_smashed_bytes_up"] == record["smashed_bytes_up"]
    assert summary["test_perplexity"] > 0 and summary["method"] == "prompt"

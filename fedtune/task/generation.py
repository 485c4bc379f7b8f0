"""Generation quality of a causal language model: continuation ROUGE-L.

The bundled corpus has no separate subject line (subject and body run together in `text`),
so the figure is continuation quality: given the first `prompt_tokens` tokens of a held-out
message, the model greedily writes `new_tokens` tokens, scored by ROUGE-L F1 (the
`rouge-score` package, stemmed) against the decoded true next `new_tokens` tokens.

Everything here calls only `logits_fn(input_ids, attention_mask) -> logits [B, T, V]`, the
forward of any causal model (a bare HF model, a tuned one, a split one), so the metric plugs
into any of them. There is no KV cache: each new token reruns the whole sequence, which
costs about `N * P + N**2 / 2` token forwards per example (the defaults are sized by that).

Prompts are right-padded: a causal model's logits at a real position never see the pads
after it, and the position ids (absolute for GPT-2) are the same as one-by-one, which left
padding would shift for a forward that takes no position ids. Finished rows leave the
batch. Greedy decoding and the fixed row order make the figure deterministic: no randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Stemmed ROUGE-L, as summarization papers report it.
ROUGE_TYPE = "rougeL"

# Defaults, calibrated on SmolLM2-135M and list-ham test messages (benchmarks/RESULTS.md,
# "Causal LM"): a 64-token prompt leaves fewer continuations at a ROUGE of 0 than 32 (20 of
# 64 against 33 of 64 untuned: a floor hides a pruned model's loss) and 16 new tokens moved
# with a 33 % perplexity drop where 32 did not, at less than half the cost. 32 examples keep
# the metric near a minute on 2 cores (no KV cache); the figure is noisy at that size
# (paired standard error about 0.014 against a tuning gain of about 0.02): use more
# examples where a comparison must resolve a few points.
DEFAULT_PROMPT_TOKENS = 64
DEFAULT_NEW_TOKENS = 16
DEFAULT_EXAMPLES = 32


def _eos_ids(tokenizer: Any) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(eos) if isinstance(eos, (list, tuple, set, frozenset)) else frozenset([eos])


def _pad_id(tokenizer: Any) -> int:
    """Any id will do (pads are masked and sit after every real token), but a real one keeps
    an embedding lookup in range."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@torch.inference_mode()
def greedy_continue(logits_fn: LogitsFn, tokenizer: Any, prompts_ids: Sequence[Sequence[int]],
                    max_new: int, batch_size: int) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids): up to `max_new` new tokens each,
    stopping after the tokenizer's end-of-sequence token (not included in the result).
    Batches of `batch_size` prompts give the same tokens as one prompt at a time."""
    _positive("max_new", max_new)
    _positive("batch_size", batch_size)
    prompts = [[int(t) for t in p] for p in prompts_ids]
    if any(not p for p in prompts):
        raise ValueError("greedy_continue: every prompt needs at least one token")
    eos, pad = _eos_ids(tokenizer), _pad_id(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(_greedy_batch(logits_fn, prompts[start:start + batch_size], max_new, eos,
                                 pad))
    return out


def _greedy_batch(logits_fn: LogitsFn, prompts: list[list[int]], max_new: int,
                  eos: frozenset[int], pad: int) -> list[list[int]]:
    rows = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        lengths = torch.tensor([len(rows[i]) for i in live])
        width = int(lengths.max())
        ids = torch.full((len(live), width), pad, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for r, i in enumerate(live):
            ids[r, :len(rows[i])] = torch.tensor(rows[i])
            mask[r, :len(rows[i])] = 1
        logits = logits_fn(ids, mask)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (len(live), width):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected "
                             f"[{len(live)}, {width}, vocabulary]")
        # Each row's next token is read at its own last real position.
        last = logits[torch.arange(len(live), device=logits.device),
                      (lengths - 1).to(logits.device)]
        still = []
        for i, token in zip(live, last.argmax(-1).tolist(), strict=True):
            if token in eos:
                continue
            rows[i].append(token)
            new[i].append(token)
            if len(new[i]) < max_new:
                still.append(i)
        live = still
    return new


def rouge_scorer() -> tuple[Any, Any]:
    """The ROUGE-L scorer and the word tokenizer it scores with (lower-cased, stemmed,
    alphanumeric words only)."""
    try:
        from rouge_score import rouge_scorer as rs
        from rouge_score.tokenizers import DefaultTokenizer
    except ImportError:
        raise ImportError("the generation metric needs the rouge-score package "
                          "(pip install rouge-score)") from None
    words = DefaultTokenizer(use_stemmer=True)
    return rs.RougeScorer([ROUGE_TYPE], tokenizer=words), words


@dataclass(frozen=True)
class Continuations:
    """The rows a ROUGE-L figure is computed on: each scored row's prompt and reference
    token ids and its decoded reference, with the counts of rows skipped as too short and
    as without a scoreable word."""

    prompts: list[list[int]]
    reference_ids: list[list[int]]
    references: list[str]
    short: int
    no_words: int


def select_continuations(tokenizer: Any, token_rows: Iterable[Sequence[int]],
                         prompt_tokens: int, new_tokens: int, max_examples: int
                         ) -> Continuations:
    """The first `max_examples` rows (all if <= 0) at least `prompt_tokens + new_tokens`
    long whose reference has a word ROUGE can score, in order, cut to their prompt and
    reference: what `continuation_scores` scores (the untrained-figures cache keys on it)."""
    _positive("prompt_tokens", prompt_tokens)
    _positive("new_tokens", new_tokens)
    if not isinstance(max_examples, int) or isinstance(max_examples, bool):
        raise ValueError(f"max_examples must be an integer, got {max_examples!r}")
    _, words = rouge_scorer()
    prompts: list[list[int]] = []
    reference_ids: list[list[int]] = []
    references: list[str] = []
    short = no_words = 0
    for row in token_rows:
        if 0 < max_examples <= len(prompts):
            break
        row = [int(t) for t in row]
        if len(row) < prompt_tokens + new_tokens:
            short += 1
            continue
        reference = tokenizer.decode(row[prompt_tokens:prompt_tokens + new_tokens],
                                     skip_special_tokens=True)
        if not words.tokenize(reference):
            no_words += 1
            continue
        prompts.append(row[:prompt_tokens])
        reference_ids.append(row[prompt_tokens:prompt_tokens + new_tokens])
        references.append(reference)
    return Continuations(prompts, reference_ids, references, short, no_words)


def continuation_scores(logits_fn: LogitsFn, tokenizer: Any,
                        token_rows: Iterable[Sequence[int]], prompt_tokens: int,
                        new_tokens: int, max_examples: int, batch_size: int
                        ) -> tuple[list[float], int, int]:
    """Each scored row's ROUGE-L F1 (see `continuation_rouge`), with the counts of rows
    skipped as too short and as without a scoreable word."""
    chosen = select_continuations(tokenizer, token_rows, prompt_tokens, new_tokens,
                                  max_examples)
    scorer, _ = rouge_scorer()
    generated = greedy_continue(logits_fn, tokenizer, chosen.prompts, new_tokens, batch_size) \
        if chosen.prompts else []
    scores = [scorer.score(ref, tokenizer.decode(gen, skip_special_tokens=True))[ROUGE_TYPE]
              .fmeasure for ref, gen in zip(chosen.references, generated, strict=True)]
    return scores, chosen.short, chosen.no_words


def continuation_rouge(logits_fn: LogitsFn, tokenizer: Any,
                       token_rows: Iterable[Sequence[int]], prompt_tokens: int,
                       new_tokens: int, max_examples: int, batch_size: int) -> dict[str, Any]:
    """Mean ROUGE-L F1 of greedy continuations: for each row of token ids (no padding), in
    order, the first `prompt_tokens` are the prompt and the next `new_tokens` the reference.
    Rows shorter than `prompt_tokens + new_tokens` are skipped and counted (`skipped_short`),
    as are rows whose reference has no word ROUGE can score, e.g. only punctuation
    (`skipped_no_words`: even a perfect continuation would score 0 there). The first
    `max_examples` rows that qualify are scored (all of them if `max_examples` <= 0).
    `rouge_l` is None when no row qualifies."""
    scores, short, no_words = continuation_scores(logits_fn, tokenizer, token_rows,
                                                  prompt_tokens, new_tokens, max_examples,
                                                  batch_size)
    return {"rouge_l": sum(scores) / len(scores) if scores else None,
            "examples": len(scores), "skipped_short": short, "skipped_no_words": no_words}

"""Causal language modelling as a task: the rows (users' texts), their targets, the loss a
client trains on and the server's perplexity.

- Targets: the input ids themselves, -100 (ignored) on padding: position t predicts t+1.
  Rows are padded on the right whatever side the backbone's tokenizer pads on
  (`prepare_tokenizer`; `lm_targets` refuses other rows): a text's first token is never
  "predicted" from a pad, positions count from its first token, and split mode's all-ones
  smashed-DP mask changes no real position (causal attention never sees later pads).
- Loss (`NextTokenLoss`): token cross entropy averaged over each sequence's real predicted
  tokens, then over the batch. Each sequence is thus one example whose loss does not depend
  on the others', which is what Opacus' per-sample clipping (a message = the privacy unit)
  and its mean-reduction scaling assume.
- Evaluation (`evaluate_lm`): token-weighted, the exp of the total NLL over the total
  predicted tokens (a long message weighs by its tokens, as perplexity is usually read).
  A forward holds at most LOGITS_BUDGET logits: a batch is cut to fit (evaluation's, and a
  client's training step's: `rows_within_budget`), and a backbone whose one row passes it
  is refused (`check_logits_budget`). A diverged model's figures stay
  strict JSON: a perplexity past a float (or of a NaN loss) is null, and the log says why.
- Generation quality (`generation_quality`, the final model and its untrained baseline
  only): ROUGE-L of greedy continuations of test texts (`fedtune.task.generation`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedtune.config.errors import ConfigError

if TYPE_CHECKING:
    import datasets

    from fedtune.config import ExperimentConfig
    from fedtune.task.rows import Split
    from fedtune.tuning import TunedModel

log = logging.getLogger(__name__)
IGNORE = -100
# Logits held at once by a forward, evaluation's or a client's training step's (floats):
# 2^26 = 256 MiB. An LM's logits are rows x tokens x vocabulary: the default
# train.eval_batch_size of 128 rows of 128 tokens of SmolLM2's 49,152-word vocabulary would
# be 3.2 GB, so a batch is cut to fit.
LOGITS_BUDGET = 1 << 26
# The library that computes ROUGE-L (the lm extra), by its import name and its distribution.
ROUGE_MODULE, ROUGE_DISTRIBUTION = "rouge_score", "rouge-score"


class LMDataError(ValueError):
    """The corpus leaves no text to train a language model on; the message says why."""


def prepare_tokenizer(tokenizer: Any) -> None:
    """Pad on the right, with the end-of-sequence token when the tokenizer has no pad token
    (GPT-2 and Llama tokenizers ship without one); the padded positions are masked out of
    the loss. Right, whatever the model folder's tokenizer_config.json says (several chat
    models' pad left, for batched generation): every position t of a row then predicts
    t + 1 of the same text, and positions count from the text's first token."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise LMDataError("the backbone's tokenizer has neither a pad nor an end-of-sequence "
                          "token to pad with; give the model folder a tokenizer with one")
    tokenizer.pad_token = tokenizer.eos_token


def lm_targets(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The label array of a causal-LM split: the ids, IGNORE where the mask is 0 (int32).
    Rows must be right-padded (real tokens, then pads): a pad before a real token would
    score that token as predicted from the pad (`token_nll` pairs t with t + 1)."""
    ids = np.asarray(input_ids, dtype=np.int32)
    real = np.asarray(attention_mask) != 0
    if real.ndim == 2 and real.shape[1] > 1 and (real[:, 1:] > real[:, :-1]).any():
        row = int(np.flatnonzero((real[:, 1:] > real[:, :-1]).any(axis=1))[0])
        raise LMDataError(f"row {row} of a causal-LM split has padding before a real token: "
                          "the rows must be padded on the right (prepare_tokenizer sets it)")
    return np.where(real, ids, np.int32(IGNORE)).astype(np.int32)


# Corpus name -> the rows of that corpus that are users' own text (all rows, by default).
def _spamassassin_ham(ds: datasets.Dataset) -> datasets.Dataset:
    """Ham only: spam is not any user's own writing."""
    labels = np.asarray(ds["label"])
    return ds.select(np.flatnonzero(labels == 0))


LM_ROWS = {"spamassassin": _spamassassin_ham}


def select_rows(corpus: datasets.DatasetDict, cfg: ExperimentConfig) -> datasets.DatasetDict:
    """The rows a causal-LM run trains and tests on: the corpus' own rule (`LM_ROWS`), then,
    unless `task.keep_unattributed`, only rows whose `data.by` column names a user (when the
    corpus has that column). A split left empty is an error naming what emptied it."""
    import datasets

    rule = LM_ROWS.get(cfg.data.corpus)
    by = cfg.data.by
    out = {}
    for name in ("train", "test"):
        ds = corpus[name]
        if rule is not None:
            ds = rule(ds)
        if not cfg.task.keep_unattributed and by in ds.column_names:
            values = ds[by]
            ds = ds.select([i for i, v in enumerate(values) if v not in (None, "")])
        if len(ds) == 0:
            raise LMDataError(
                f"corpus {cfg.data.corpus!r}: no {name} row is left for task.kind="
                f"'causal_lm' (its users' texts{', ham only' if rule else ''}, rows with an "
                f"empty data.by={by!r} dropped); set task.keep_unattributed=true or check "
                "the data")
        out[name] = ds
    return datasets.DatasetDict(out)


class NextTokenLoss(nn.Module):
    """Mean over the batch of each sequence's mean next-token cross entropy."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sequence_losses(logits, labels).mean()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted position: the NLL of token t+1 from the logits at t ([B, T-1]) and
    whether it counts (its target is not IGNORE)."""
    predicted = logits[:, :-1]
    target = labels[:, 1:].long()
    counted = target != IGNORE
    nll = nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]).float(),
                                      target.reshape(-1), ignore_index=IGNORE,
                                      reduction="none").view(target.shape)
    return nll * counted, counted


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean NLL over its counted tokens ([B]); 0 for a sequence with none
    (a one-token text predicts nothing)."""
    nll, counted = token_nll(logits, labels)
    return nll.sum(dim=1) / counted.sum(dim=1).clamp(min=1)


@torch.inference_mode()
def evaluate_lm(model: TunedModel, split: Split, batch_size: int, max_examples: int = 0,
                states: np.ndarray | None = None) -> dict[str, float | None]:
    """Token-weighted loss (total NLL / predicted tokens) and perplexity (its exp) on the
    first `max_examples` rows of `split` (all if 0). With `states` (the split's cached
    prefix states, row for row) the model runs only the blocks above its frozen prefix
    (`forward_from`)."""
    model.eval()
    n = len(split) if max_examples <= 0 else min(max_examples, len(split))
    step = _rows_per_forward(model, split, batch_size)
    total, tokens = 0.0, 0
    for start in range(0, n, step):
        stop = min(start + step, n)
        ids, mask, labels = split.tensors(np.arange(start, stop)).tensors
        if states is None:
            logits = model(ids, mask)
        else:
            logits = model.forward_from(torch.from_numpy(np.array(states[start:stop])), mask)
        nll, counted = token_nll(logits, labels)
        total += float(nll.sum(dtype=torch.float64))
        tokens += int(counted.sum())
    loss = total / tokens if tokens else None
    if not tokens:
        log.warning("causal-LM evaluation: no next token to predict in %d rows (each text "
                    "is at most one token within model.max_length); its loss and perplexity "
                    "are recorded as null", n)
    elif not math.isfinite(loss):
        # NaN or inf is not JSON (RFC 8259): the ledger records null, the log says why.
        log.warning("causal-LM evaluation: the token loss is %s on %d tokens (the model "
                    "diverged); its loss and perplexity are recorded as null", loss, tokens)
        loss = None
    elif perplexity(loss) is None:
        log.warning("causal-LM evaluation: the token loss is %.1f nats (the model diverged); "
                    "its perplexity exp(loss) overflows a float and is recorded as null", loss)
    return {"accuracy": None, "loss": loss, "perplexity": perplexity(loss),
            "tokens": float(tokens), "examples": float(n)}


def _vocabulary(model: Any) -> int:
    """The width of `model`'s logits (its backbone's vocabulary; 0 where unknown)."""
    config = getattr(getattr(model, "backbone", None), "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


def _positions(model: Any, length: int) -> int:
    """Positions a forward of `length`-token rows computes logits at: a soft prompt's too
    (sliced off after the head has computed them)."""
    prompt = getattr(getattr(model, "prompt", None), "embedding", None)
    return length + int(getattr(prompt, "num_embeddings", 0) or 0)


def check_logits_budget(model: Any, length: int) -> None:
    """Refuse, in one line naming model.max_length, a model whose one row of `length` tokens
    has more logits than LOGITS_BUDGET: evaluation never cuts a batch below one row, so
    such a row would be held whole (SmolLM2 at max_length 65,536: 12.9 GB)."""
    vocab = _vocabulary(model)
    row = vocab * _positions(model, length)
    if vocab > 0 and row > LOGITS_BUDGET:
        most = LOGITS_BUDGET // vocab - (_positions(model, length) - length)
        raise ConfigError(
            f"model.max_length={length}: one row's logits ({_positions(model, length):,} "
            f"positions x {vocab:,} words = {row:,} floats) pass the evaluation budget of "
            f"{LOGITS_BUDGET:,} floats ({LOGITS_BUDGET * 4 // 2**20} MiB); set "
            f"model.max_length <= {max(most, 0)} for this backbone")


def rows_within_budget(model: Any, length: int) -> int | None:
    """Rows of `length` tokens whose logits fit LOGITS_BUDGET at once (at least one: a
    longer row is refused by `check_logits_budget`); None where the vocabulary is unknown.
    Evaluation cuts its batches to it, and so does a client's training step
    (`clients.train.PlainStep`): an LM's logits, kept for the backward pass too, are the
    step's largest tensor (SmolLM2, 64 rows of 1,024 tokens: 12.9 GB)."""
    vocab = _vocabulary(model)
    if vocab <= 0:
        return None
    check_logits_budget(model, length)
    return max(1, LOGITS_BUDGET // (vocab * _positions(model, length)))


def check_training_budget(model: Any, cfg: ExperimentConfig) -> None:
    """`check_logits_budget`, and, in split mode, refuse a train.batch_size whose logits
    pass LOGITS_BUDGET: the tail computes the whole batch's logits on the client in one
    forward (the body's answer is one batch), where the plain step cuts a batch into parts."""
    length = cfg.model.max_length
    most = rows_within_budget(model, length)
    if most is None or not cfg.split.enabled or cfg.train.batch_size <= most:
        return
    vocab, positions = _vocabulary(model), _positions(model, length)
    raise ConfigError(
        f"split.enabled: train.batch_size={cfg.train.batch_size} rows x model.max_length="
        f"{length} ({positions:,} positions) x {vocab:,} words = "
        f"{cfg.train.batch_size * positions * vocab:,} logits pass the budget of "
        f"{LOGITS_BUDGET:,} floats ({LOGITS_BUDGET * 4 // 2**20} MiB) that split mode's tail "
        f"holds at once; set train.batch_size <= {most} (or a lower model.max_length)")


def _rows_per_forward(model: TunedModel, split: Split, batch_size: int) -> int:
    """`batch_size`, or fewer rows where their logits would pass LOGITS_BUDGET (the same
    figures: every row is scored on its own); never past it (`check_logits_budget`)."""
    length = int(split.input_ids.shape[1]) if split.input_ids.ndim == 2 else 1
    most = rows_within_budget(model, length)
    return batch_size if most is None else min(batch_size, most)


def rouge_library() -> str | None:
    """The version of the library that computes ROUGE-L where it can be imported, else None
    (its figure is then null): the untrained-figures cache keys on it, so a null stored
    before the lm extra was installed is never served after."""
    if importlib.util.find_spec(ROUGE_MODULE) is None:
        return None
    try:
        return importlib.metadata.version(ROUGE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unversioned"


def _rouge_unmeasured(split: Split, cfg: ExperimentConfig) -> str | None:
    """Why `split`'s test_rouge_l is null under `cfg` ("" where it is not asked for), or
    None where it is measured."""
    task = cfg.task
    need = task.generation_prompt_tokens + task.generation_new_tokens
    if task.generation_examples <= 0:
        return ""
    if split.input_ids.shape[1] < need:
        # A config that asks for the metric but cannot hold it stays valid (short texts
        # are how small runs test); the run says why its ROUGE-L is null.
        return (f"test_rouge_l is null: model.max_length={cfg.model.max_length} holds no "
                f"task.generation_prompt_tokens + task.generation_new_tokens = {need} "
                "tokens; raise model.max_length or set task.generation_examples=0")
    if rouge_library() is None:
        # A config must stay valid without the lm extra (it is checked everywhere); the
        # run says why its ROUGE-L is null instead of failing after its rounds.
        return ("test_rouge_l is null: the generation metric needs rouge-score "
                "(pip install -e '.[lm]')")
    return None


def _unpadded_rows(split: Split):
    return (ids[mask.astype(bool)].tolist()
            for ids, mask in zip(split.input_ids, split.attention_mask, strict=True))


def generation_texts(split: Split, tokenizer: Any, cfg: ExperimentConfig) -> list[np.ndarray]:
    """The token ids `generation_quality` computes `split`'s ROUGE-L on: each scored text's
    prompt and reference (none where the figure is null). The untrained-figures cache keys
    on them: the texts are scanned from the whole split, past train.eval_max_examples."""
    if _rouge_unmeasured(split, cfg) is not None:
        return []
    from fedtune.task.generation import select_continuations

    task = cfg.task
    chosen = select_continuations(tokenizer, _unpadded_rows(split),
                                  task.generation_prompt_tokens, task.generation_new_tokens,
                                  task.generation_examples)
    return [np.asarray(prompt + reference, dtype=np.int64)
            for prompt, reference in zip(chosen.prompts, chosen.reference_ids, strict=True)]


def generation_quality(model: TunedModel, split: Split, tokenizer: Any,
                       cfg: ExperimentConfig) -> dict[str, float | None]:
    """`rouge_l` of `model`'s greedy continuations of the first `task.generation_examples`
    texts of `split` at least `generation_prompt_tokens + generation_new_tokens` long (None:
    not measured, or no text that long within `model.max_length`)."""
    task = cfg.task
    why = _rouge_unmeasured(split, cfg)
    if why is not None:
        if why:
            log.warning("%s", why)
        return {"rouge_l": None}
    from fedtune.task.generation import continuation_rouge

    model.eval()
    with torch.inference_mode():
        scored = continuation_rouge(
            lambda ids, mask: model(ids, mask), tokenizer, _unpadded_rows(split),
            task.generation_prompt_tokens, task.generation_new_tokens,
            task.generation_examples,
            _rows_per_forward(model, split, cfg.train.eval_batch_size))
    return {"rouge_l": scored["rouge_l"]}


def perplexity(loss: float | None) -> float | None:
    """exp(mean token NLL); None where the loss is (no split, no token) and where there is
    no finite perplexity (a NaN loss, or one past about 709.8 nats, whose exp overflows a
    float: a diverged model): the ledger is strict JSON, never Infinity."""
    if loss is None or not math.isfinite(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None

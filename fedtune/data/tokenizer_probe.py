"""What a tokenizer does, as bytes to hash: the ids it encodes a fixed set of probe texts to
and the text it decodes ids back to.

A fast tokenizer's serialized pipeline (vocabulary, normalizer, post-processor) is not all
of it: transformers applies `tokenizer_config.json` switches in Python around that pipeline
(`split_special_tokens` changes the ids a text containing "[SEP]" gets,
`clean_up_tokenization_spaces` the text generated ids decode to), and a later version may add
another. Listing such keys would miss the next one; hashing their effect does not. The probes
are built to show every switch known to act outside the pipeline: each added/special token's
text inside a sentence, spacing around punctuation and contractions, case, accents,
compatibility forms, CJK, whitespace runs, emoji; encoded with and without special tokens,
padded and truncated as fedtune calls it, and decoded with and without special tokens. A
setting whose effect shows on none of these texts is not seen (nor is it likely to change a
prediction); the pipeline, hashed next to this, covers the vocabulary itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PROBE_TEXTS = (
    "hello , world . it ' s done ; isn ' t it ? yes ! ( no ) \" quoted \" don't",
    "The Build FAILED again - see you TOMORROW at 10:30, ok?",
    "  leading and   inner   spaces\tand a tab\nand a new line  ",
    "Café naïve résumé Ångström Straße façade",
    "ﬁle ＦＵＬＬ ｗｉｄｔｈ ① ½ ™ e\u0301",
    "中文字符 日本語のテキスト 한국어",
    "emoji 🙂👍🏽 and symbols <>&%$#@~^|\\",
    "mail me at a.b@example.com or https://example.org/x?y=1#z",
    "0123456789 3.14159 -42 1e-5 1,000,000",
)
# Fedtune's own call shape, at a length that cuts the longer probe: padding and truncation
# side, padding id and the attention mask.
_PAD_TRUNCATE = 8
# Ids decoded as given (a generation is any id sequence): the first and the last of the
# vocabulary, where the special and byte-level tokens sit.
_DECODED_IDS = 256


def tokenizer_behaviour(tokenizer: Any) -> bytes:
    """sha256 (hex, as bytes) of how `tokenizer` encodes `PROBE_TEXTS` and texts made of its
    own added tokens, and how it decodes ids. Deterministic for one tokenizer; calling the
    tokenizer leaves only its per-call padding/truncation state behind (which every later
    call sets again)."""
    texts = [*PROBE_TEXTS, *_added_token_texts(tokenizer)]
    seen: list[Any] = []
    for text in texts:
        seen.append(_attempt(lambda t=text: _encode_decode(tokenizer, t)))
    seen.append(_attempt(lambda: _padded(tokenizer, [texts[1], texts[0]])))
    size = len(tokenizer)
    fixed = [*range(min(size, _DECODED_IDS)), *range(max(_DECODED_IDS, size - _DECODED_IDS),
                                                     size)]
    for skip in (True, False):
        seen.append(_attempt(lambda s=skip: tokenizer.decode(fixed, skip_special_tokens=s)))
    return hashlib.sha256(json.dumps(seen, ensure_ascii=True).encode()).hexdigest().encode()


def _added_token_texts(tokenizer: Any) -> list[str]:
    """Every added or special token's text, inside words and between them (where
    `split_special_tokens` and the tokens' strip settings act)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    contents = [str(getattr(tok, "content", tok)) for _, tok in sorted(decoder.items())]
    contents += [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
    contents = list(dict.fromkeys(c for c in contents if c))
    if not contents:
        return []
    return ["a " + " b ".join(contents) + " c", "a" + "b".join(contents) + "c"]


def _encode_decode(tokenizer: Any, text: str) -> list[Any]:
    ids = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [ids, plain, tokenizer.decode(ids, skip_special_tokens=True),
            tokenizer.decode(ids, skip_special_tokens=False)]


def _padded(tokenizer: Any, texts: list[str]) -> Any:
    if getattr(tokenizer, "pad_token", None) is None:
        return "no pad token"
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=_PAD_TRUNCATE)
    return [list(map(list, enc["input_ids"])), list(map(list, enc["attention_mask"]))]


def _attempt(probe: Any) -> Any:
    """The probe's result, or the error it raised (a tokenizer that refuses a text behaves
    otherwise than one that encodes it)."""
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - any failure is behaviour, recorded by type
        return f"raised {type(exc).__name__}"

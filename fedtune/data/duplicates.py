"""Copies of training rows: which validation and test rows the model may already have seen.

A corpus can hold one message more than once (the SpamAssassin collections share mails, and
mailing lists resend them), so a validation or test row can be a training row again, which
inflates the validation accuracy that selects and the test accuracy read once "on unseen
data". Two rows are copies when either

- their texts are equal after normalisation: Unicode NFKC, case folded, every run of
  whitespace one space (copies re-wrapped, re-capitalised or with odd spaces), or
- their model inputs are equal: the same token ids and mask at the run's `model.max_length`.
  That is the tokenizer's own normalisation (MiniLM's lower-cases and strips accents) and its
  truncation: the model reads nothing past `max_length`, so two mails that share their first
  `max_length` tokens are one example to it and get one prediction.

Measured on the bundled SpamAssassin corpus (builder already drops exact duplicate texts;
quickstart: seed 0, 64 tokens): the text rule finds 1 validation row and 1 test row with a
copy among the training rows, the token rule 7 of 468 validation rows (among the clients'
rows) and 14 of 1,208 test rows (13 among the clients' rows), the union the same 7 and 14.
An alphanumeric-only text rule would add 1 test row; the token rule finds 17 / 45 at 32
tokens, 5 / 8 at 128 and 2 / 1 at 256.
Mail headers are not compared: the bundled corpus keeps subject and body only (a corpus of
raw messages whose copies differ in Message-ID or Date should be reduced the same way when
it is built, as `build_spamassassin` does).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np


def normalise_text(text: str) -> str:
    """The text a copy is recognised by: NFKC, case folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class RowKeys:
    """Two keys per row (normalised text, model input), as 16-byte digests so a large corpus
    costs 32 bytes a row. Rows i and j are copies when either key is equal."""

    def __init__(self, texts: Sequence[str], input_ids: np.ndarray,
                 attention_mask: np.ndarray) -> None:
        if not len(texts) == len(input_ids) == len(attention_mask):
            raise ValueError(f"{len(texts)} texts but {len(input_ids)} token rows and "
                             f"{len(attention_mask)} masks")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int8)
        self.text = [_digest(normalise_text(t).encode("utf-8", "surrogatepass")) for t in texts]
        self.tokens = [_digest(ids[i].tobytes() + mask[i].tobytes()) for i in range(len(ids))]

    def __len__(self) -> int:
        return len(self.text)

    def found_in(self, other: RowKeys, among: np.ndarray | None = None) -> np.ndarray:
        """A bool per row of self: whether it is a copy of a row of `other` (of its rows
        `among`, default all)."""
        rows = range(len(other)) if among is None else np.asarray(among, dtype=np.int64)
        texts = {other.text[i] for i in rows}
        tokens = {other.tokens[i] for i in rows}
        return np.fromiter((t in texts or k in tokens for t, k in zip(self.text, self.tokens,
                                                                      strict=True)),
                           dtype=bool, count=len(self))

    def repeated(self) -> np.ndarray:
        """A bool per row: whether another row of the same keys is a copy of it."""
        texts, tokens = Counter(self.text), Counter(self.tokens)
        return np.fromiter((texts[t] > 1 or tokens[k] > 1 for t, k in zip(self.text,
                                                                           self.tokens,
                                                                           strict=True)),
                           dtype=bool, count=len(self))

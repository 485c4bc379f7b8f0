"""MkDocs hooks (mkdocs.yml `hooks:`).

Docstrings write a tokenizer's special tokens as they print, `[CLS] [SEP]`, which Markdown
reads as a reference link and mkdocs-autorefs reports as an unresolved cross-reference: a
warning that fails `mkdocs build --strict`. The text still renders as written. This filter
drops that one warning for these token names only; any other unresolved reference still fails
the build. (The product modules are not edited for the docs' sake.)
"""

from __future__ import annotations

import logging
import re

SPECIAL_TOKENS = ("CLS", "SEP", "PAD", "MASK", "UNK", "BOS", "EOS")
_TOKEN_REFERENCE = re.compile(
    r"Could not find cross-reference target '(?:%s)'$" % "|".join(SPECIAL_TOKENS))


class _SpecialTokenReferences(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _TOKEN_REFERENCE.search(record.getMessage())


def on_startup(command: str, dirty: bool) -> None:
    # get_plugin_logger(__name__) in mkdocs_autorefs/_internal/plugin.py.
    logging.getLogger("mkdocs.plugins.mkdocs_autorefs._internal.plugin").addFilter(
        _SpecialTokenReferences())

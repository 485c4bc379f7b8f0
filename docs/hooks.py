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

from mkdocs.config.defaults import MkDocsConfig

SPECIAL_TOKENS = ("CLS", "SEP", "PAD", "MASK", "UNK", "BOS", "EOS")
_TOKEN_REFERENCE = re.compile(
    rf"Could not find cross-reference target '(?:{'|'.join(SPECIAL_TOKENS)})'$")


class _SpecialTokenReferences(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _TOKEN_REFERENCE.search(record.getMessage())


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    # autorefs logs through get_plugin_logger(__name__): "mkdocs.plugins.mkdocs_autorefs..."
    # with a module path that moves between its releases, so every such logger gets the filter
    # (the plugin is imported by now; a filter on a parent logger would not apply).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("mkdocs.plugins.mkdocs_autorefs"):
            logging.getLogger(name).addFilter(_SpecialTokenReferences())
    return config

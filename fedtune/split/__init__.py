"""Split learning of a prompt (SFPrompt): the client-side model view, the server body
service and the FLOPs accounting.

The names below load on first use (PEP 562): the ledger reads the names of split's figures
(`fedtune.split.figures`) at config time, which must not import torch, and importing any
submodule runs this file first.
"""

from __future__ import annotations

from typing import Any

_BODY = ("BodyService", "InProcessBody", "MeteredBody", "Traffic")
_FLOPS = ("SplitFlops", "scoring_flops", "split_flops")
__all__ = sorted((*_BODY, *_FLOPS, "SplitPromptModel"))


def __getattr__(name: str) -> Any:
    if name in _BODY:
        from fedtune.split import body
        return getattr(body, name)
    if name in _FLOPS:
        from fedtune.split import flops
        return getattr(flops, name)
    if name == "SplitPromptModel":
        from fedtune.split.model import SplitPromptModel
        return SplitPromptModel
    raise AttributeError(f"module 'fedtune.split' has no attribute {name!r}")

"""Split learning of a prompt (SFPrompt): the client-side model view, the server body
service and the FLOPs accounting."""

from fedtune.split.body import BodyService, InProcessBody, MeteredBody, Traffic
from fedtune.split.flops import SplitFlops, scoring_flops, split_flops
from fedtune.split.model import SplitPromptModel

__all__ = ["BodyService", "InProcessBody", "MeteredBody", "SplitFlops", "SplitPromptModel",
           "Traffic", "scoring_flops", "split_flops"]

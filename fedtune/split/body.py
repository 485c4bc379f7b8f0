"""The server's frozen body as a service: forward(smashed) -> output, backward(grad) ->
grad at the cut.

Split clients talk to the body only through `BodyService`, so a networked body (a
deployment server keyed by client) can replace the in-process one without touching the
client. It sees every trained example's cut-layer activations and body-output gradients,
which carry its text and its label (see `fedtune.split.smashed_dp` for their protection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedtune.split.cut import SplitBackbone


class BodyService(Protocol):
    def forward(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the body on cut-layer states; returns its (detached) output."""
        ...

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the smashed input of the latest `forward`, given the gradient
        w.r.t. its output."""
        ...

    def evaluate(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's output with no backward to follow (scoring examples for pruning)."""
        ...


class InProcessBody:
    """The body run by the same process as the client (simulation: one per process,
    built on the process-wide backbone, used by one client at a time)."""

    def __init__(self, split: SplitBackbone) -> None:
        self.split = split
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = smashed.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.split.body(inputs, attention_mask)
        self._pending = (inputs, output)
        return output.detach()

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("body backward without a forward to match")
        inputs, output = self._pending
        self._pending = None
        # The body is frozen: only the input gradient is wanted, never weight gradients.
        (grad,) = torch.autograd.grad(output, inputs, grad_output)
        return grad

    @torch.no_grad()
    def evaluate(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.split.body(smashed, attention_mask)

    def discard(self) -> None:
        """Drop the graph of a forward that will get no backward (evaluation, errors)."""
        self._pending = None


@dataclass
class Traffic:
    """Smashed-data bytes, as the tensors' sizes in memory (what a wire format without
    compression carries): up = client -> server, down = server -> client."""

    bytes_up: int = 0
    bytes_down: int = 0
    exchanges: int = 0


class MeteredBody:
    """A `BodyService` that counts every tensor crossing the client/server boundary."""

    def __init__(self, body: BodyService) -> None:
        self.body = body
        self.traffic = Traffic()

    def forward(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._exchange(self.body.forward, smashed, attention_mask)

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        self.traffic.bytes_up += _nbytes(grad_output)
        grad = self.body.backward(grad_output)
        self.traffic.bytes_down += _nbytes(grad)
        return grad

    def evaluate(self, smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._exchange(self.body.evaluate, smashed, attention_mask)

    def _exchange(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  smashed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.traffic.bytes_up += _nbytes(smashed) + _nbytes(attention_mask)
        output = run(smashed, attention_mask)
        self.traffic.bytes_down += _nbytes(output)
        self.traffic.exchanges += 1
        return output

def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

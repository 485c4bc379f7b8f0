"""FLOPs of split training, counted by torch's FlopCounterMode on one example.

Matmul FLOPs are linear in the batch and sequences are padded to one length, so examples x
these per-example counts are the exact totals of the steps taken. Client and server shares
are counted under separate counters, in the order the split protocol runs them.

The example is a synthetic probe (`probe_input`: fixed token ids, all-ones mask), never a
client's row: the body the probe runs through is the server's, and a client row sent for
measuring would leave unclipped and unnoised whatever `split.smashed_dp` says. FLOPs do not
depend on the token values, only on the shape. Callers pass the metered body, so the probe
is counted as traffic; `probing()` tells a recorder which exchange is the probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedtune.split.body import BodyService
from fedtune.split.model import SplitParts


@dataclass(frozen=True)
class SplitFlops:
    """Per-example forward + backward FLOPs."""

    client_split: float  # a split step on the client: head, tail and the head's backward
    server: float  # a split step on the server: body forward + input-gradient backward
    client_local: float  # a local-loss step: head + auxiliary classifier, no server
    full: float  # federated full fine-tuning: every backbone weight (+ classifier) trained

    def client_fraction(self, local_loss: bool = False) -> float:
        return (self.client_local if local_loss else self.client_split) / self.full


_CACHE: dict[tuple[Any, ...], SplitFlops] = {}
# Token id of the probe: 0 exists in every vocabulary; the value changes no FLOP count.
PROBE_TOKEN_ID = 0
_probing = False


def probing() -> bool:
    """True while a FLOP probe is crossing the body (for recorders and audits)."""
    return _probing


@contextlib.contextmanager
def _probe_running() -> Iterator[None]:
    global _probing
    _probing = True
    try:
        yield
    finally:
        _probing = False


def probe_input(view: SplitParts, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic row of `length` fixed token ids and its all-ones mask, shape (1, T):
    what FLOPs are measured on, in every mode."""
    device = next(view.parameters()).device
    ids = torch.full((1, length), PROBE_TOKEN_ID, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids)


def split_flops(view: SplitParts, body: BodyService, length: int) -> SplitFlops:
    """Counts for one example of `length` tokens, measured on the synthetic probe through
    `body` (pass the metered body: the probe is traffic); cached per process by cut layer,
    sequence length and trainable layout."""
    key = (view.split.cut_layer, view.split.tail_layers, int(length), view.num_trainable(),
           view.aux is not None, id(view.backbone), type(view))
    if key not in _CACHE:
        with _probe_running():
            _CACHE[key] = _measure(view, body, *probe_input(view, length))
    return _CACHE[key]


def _measure(view: SplitParts, body: BodyService, ids: torch.Tensor,
             mask: torch.Tensor) -> SplitFlops:
    client = server = 0.0
    view.set_phase(local_loss=False)
    flops, (smashed, full_mask) = _count(lambda: view.cut(ids, mask))
    client += flops
    flops, output = _count(lambda: body.forward(smashed.detach(), full_mask))
    server += flops
    output = output.requires_grad_(True)
    flops, _ = _count(lambda: view.tail(output, full_mask, mask).sum().backward())
    client += flops
    flops, grad = _count(lambda: body.backward(output.grad))
    server += flops
    flops, _ = _count(lambda: smashed.backward(grad))
    client += flops

    local = 0.0
    if view.aux is not None:
        view.set_phase(local_loss=True)
        local, _ = _count(lambda: _local_loss_pass(view, ids, mask))
    view.zero_grad(set_to_none=True)
    view.set_phase(local_loss=None)  # trainable_state() reads requires_grad
    return SplitFlops(client_split=client, server=server, client_local=local,
                      full=full_finetune_flops(view, ids, mask))


def scoring_flops(view: SplitParts, body: BodyService, length: int
                  ) -> tuple[float, float]:
    """Forward-only FLOPs of scoring one example of `length` tokens through the split,
    measured on the synthetic probe: (client, server)."""
    ids, mask = probe_input(view, length)
    with torch.no_grad(), _probe_running():
        head, (smashed, full_mask) = _count(lambda: view.cut(ids, mask))
        server, output = _count(lambda: body.evaluate(smashed, full_mask))
        tail, _ = _count(lambda: view.tail(output, full_mask, mask))
    return head + tail, server


def _local_loss_pass(view: SplitParts, ids: torch.Tensor, mask: torch.Tensor) -> None:
    view.aux_logits(*view.cut(ids, mask)).sum().backward()


def full_finetune_flops(view: SplitParts, ids: torch.Tensor, mask: torch.Tensor
                        ) -> float:
    """One example through federated full fine-tuning: the whole backbone (and a
    classifier's head) trainable, no prompt. The shared backbone is frozen again before
    returning."""
    params = list(view.backbone.parameters())
    try:
        for p in params:
            p.requires_grad_(True)

        flops, _ = _count(lambda: view.full_model_output(ids, mask).sum().backward())
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        view.zero_grad(set_to_none=True)
    return flops


def _count(fn: Callable[[], Any]) -> tuple[float, Any]:
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return float(counter.get_total_flops()), result

"""Process-wide torch settings for every process that trains or evaluates.

Denormal floats are flushed to zero. Under DP noise a model's activations can be extreme;
softmaxes then underflow into subnormal values, and CPU matmuls on subnormals run several
times slower (measured here: 7.8 s vs 1.2 s for one training step of a quickstart model
after a round of user-level DP at epsilon 1). Values below 1.2e-38 carry no signal.
The flag is a CPU setting, so it also flushes Python and numpy float64 values below
2.2e-308 in the same process (the accountants included): far below anything an epsilon
at a delta of 1e-5 depends on.
"""

from __future__ import annotations

import torch


def client_device(num_gpus: float) -> torch.device:
    """Where a client trains: CUDA when it was given GPUs (`simulation.num_gpus_per_client`;
    Ray then sets CUDA_VISIBLE_DEVICES for its actor), else the CPU."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"simulation.num_gpus_per_client={num_gpus} but this process sees "
                           "no CUDA device (torch.cuda.is_available() is False): install a "
                           "CUDA build of torch on the GPU workers, or set it to 0")
    return torch.device("cuda")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's trainable tensors (the batches must follow it)."""
    for param in model.parameters():
        if param.requires_grad:
            return param.device
    return torch.device("cpu")


def configure_torch(num_threads: int | None = None) -> None:
    torch.set_flush_denormal(True)
    if num_threads is not None:
        torch.set_num_threads(max(1, num_threads))

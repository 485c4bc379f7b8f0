"""Flower strategies over delta vectors, and the ServerApp that drives them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strategies.delta_fedavg import DeltaFedAvg, RoundOutcome

__all__ = ["DeltaFedAvg", "RoundOutcome"]


def __getattr__(name: str) -> Any:
    # The strategy imports torch and Flower when first asked for: `fedtune run` imports
    # `strategies.plugins` (and so this package) to validate a config before Ray starts.
    if name in __all__:
        from strategies import delta_fedavg

        return getattr(delta_fedavg, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

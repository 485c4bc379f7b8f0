"""Flower strategies over delta vectors, and the ServerApp that drives them."""

from strategies.delta_fedavg import DeltaFedAvg, RoundOutcome

__all__ = ["DeltaFedAvg", "RoundOutcome"]

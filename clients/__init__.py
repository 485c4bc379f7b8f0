"""Flower ClientApp of fedtune: local training on a client's partition, replies with a delta."""

"""Flower ClientApp of fedtune: local training on a client's partition, replies with a delta."""

from fedtune.runtime.quiet import route_from_environment

# A Ray worker of a `fedtune run` without --verbose: dependencies' warnings and log records
# go to the run's log file, set up here, before the client code imports Opacus.
route_from_environment()

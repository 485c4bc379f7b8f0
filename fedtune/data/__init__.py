"""Corpora, partitioning and cached tokenization."""

from fedtune.data.corpora import (
    CorpusError,
    available_corpora,
    load_corpus,
    register_corpus,
)
from fedtune.data.partition import available_partitioners, partition, register_partitioner
from fedtune.data.tokenize import tokenize_cached

__all__ = ["CorpusError", "available_corpora", "available_partitioners", "load_corpus",
           "partition", "register_corpus", "register_partitioner", "tokenize_cached"]

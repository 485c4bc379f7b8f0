"""Corpora, partitioning and cached tokenization: the data a federated experiment runs on.

- `load_corpus(name, **options)`: a registered corpus as a DatasetDict("train", "test")
- `partition(dataset, scheme, num_partitions, seed=...)`: one index array per client
- `tokenize_cached(dataset, tokenizer, max_length)`: token arrays, cached on disk
- `tokenize_texts(texts, tokenizer, max_length)`: the same arrays, uncached
- `partition_domains(dataset, data_cfg, seed)`: target clients, then source clients
"""

from fedtune.data.corpora import (
    CorpusError,
    available_corpora,
    corpus_options,
    corpus_sources,
    load_corpus,
    register_corpus,
)
from fedtune.data.domains import partition_domains, target_rows
from fedtune.data.partition import (
    PartitionError,
    available_partitioners,
    natural_groups,
    partition,
    register_partitioner,
)
from fedtune.data.tokenize import default_cache_dir, tokenize_cached, tokenize_texts

__all__ = [
    "CorpusError", "PartitionError", "available_corpora", "available_partitioners",
    "corpus_options", "corpus_sources", "default_cache_dir", "load_corpus", "natural_groups",
    "partition",
    "partition_domains", "register_corpus", "register_partitioner", "target_rows",
    "tokenize_cached", "tokenize_texts",
]

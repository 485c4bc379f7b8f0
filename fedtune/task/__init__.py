"""The task a run trains: model + tokenized, partitioned data (built once, cached on disk),
and its evaluation."""

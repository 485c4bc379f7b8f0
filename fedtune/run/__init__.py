"""The run folder: its file names, the ledger and atomic writes, checkpoints and resume,
the curator's log, epsilon marks, and the exported final state."""

"""Studies over many runs: sweeps, selection on validation figures, reports and plots."""

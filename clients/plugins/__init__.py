"""Client halves of the strategy plugins (`strategies.plugins`): EL2N scoring for dataset
pruning, importance weighting for population expansion."""

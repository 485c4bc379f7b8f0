"""fedtune: federated, differentially private parameter-efficient fine-tuning on Flower."""

__version__ = "0.1.0"

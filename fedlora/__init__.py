"""fedlora: federated learning with low-rank updates and adapters (Flower, PyTorch, Ray, Hydra)."""

__version__ = "0.1.0"

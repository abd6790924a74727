"""PSAT in pure PyTorch: hypernetwork ResNets, threat models and attacks, the ensemble."""

__version__ = "0.1.0"

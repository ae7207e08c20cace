"""XLNet in PyTorch: permutation language modeling with two-stream relative attention."""

__version__ = "0.1.0"

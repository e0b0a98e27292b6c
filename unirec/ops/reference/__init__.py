"""Pure-PyTorch definitions of every op: what the fast kernels must compute."""
from .embedding import embedding_bag_ref, tbe_forward_ref

__all__ = ["tbe_forward_ref", "embedding_bag_ref"]

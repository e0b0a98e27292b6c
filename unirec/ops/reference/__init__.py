"""Pure-PyTorch definitions of every op: what the fast kernels must compute."""
from .embedding import embedding_bag_ref, tbe_forward_ref

__all__ = ["tbe_forward_ref", "embedding_bag_ref"]
from .retrieval import topk_scores_ref  # noqa: E402
from .loss import softmax_cross_entropy_ref  # noqa: E402

__all__ += ["topk_scores_ref", "softmax_cross_entropy_ref"]

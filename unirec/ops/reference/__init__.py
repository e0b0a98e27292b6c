"""Pure-PyTorch definitions of every op: what the fast kernels must compute."""
from .embedding import embedding_bag_ref, tbe_forward_ref

__all__ = ["tbe_forward_ref", "embedding_bag_ref"]
from .attention import jagged_attention_mask, jagged_attention_ref  # noqa: E402

__all__ += ["jagged_attention_ref", "jagged_attention_mask"]

from .retrieval import topk_scores_ref  # noqa: E402
from .loss import softmax_cross_entropy_ref  # noqa: E402

__all__ += ["topk_scores_ref", "softmax_cross_entropy_ref"]

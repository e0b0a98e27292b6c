"""Pure-PyTorch definitions of every op: what the fast kernels must compute."""
from .attention import jagged_attention_mask, jagged_attention_ref
from .dropout import dropout_mask_ref, dropout_ref, row_draws_ref
from .embedding import embedding_bag_ref, tbe_forward_ref
from .loss import softmax_cross_entropy_ref
from .retrieval import topk_scores_ref

__all__ = [
    "tbe_forward_ref",
    "embedding_bag_ref",
    "jagged_attention_ref",
    "jagged_attention_mask",
    "topk_scores_ref",
    "softmax_cross_entropy_ref",
    "dropout_mask_ref",
    "dropout_ref",
    "row_draws_ref",
]

"""unirec's fused ops. Each takes ``impl=`` to pick a backend (see each family's module)."""
from .attention import jagged_attention
from .dropout import dropout
from .embedding import embedding_bag, empty_table, table_batched_embedding, tbe_backward_update_
from .loss import softmax_cross_entropy
from .retrieval import topk_scores

__all__ = [
    "table_batched_embedding",
    "embedding_bag",
    "tbe_backward_update_",
    "empty_table",
    "jagged_attention",
    "topk_scores",
    "softmax_cross_entropy",
    "dropout",
]

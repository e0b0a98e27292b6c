"""unirec's fused ops. Each takes ``impl=`` to pick a backend; see DESIGN of each family module."""
from .embedding import embedding_bag, table_batched_embedding, tbe_backward_update_

__all__ = ["table_batched_embedding", "embedding_bag", "tbe_backward_update_"]
from .attention import jagged_attention  # noqa: E402

__all__ += ["jagged_attention"]

from .retrieval import topk_scores  # noqa: E402
from .loss import softmax_cross_entropy  # noqa: E402

__all__ += ["topk_scores", "softmax_cross_entropy"]

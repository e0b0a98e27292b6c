"""unirec's fused ops. Each takes ``impl=`` to pick a backend from its family's ``IMPLS``.

A whole model runs on one backend choice (``impl`` of :func:`resolve_impl`): each family
takes it when it has that backend and falls back to ``"auto"`` otherwise (``"triton"`` for
the embedding, which has a CUDA C++ kernel instead). The choice is a run-time setting of the
modules (:func:`unirec.nn.set_impl`), never part of a checkpoint.
"""
from . import attention as _attention, dropout as _dropout, embedding as _embedding, loss as _loss
from . import retrieval as _retrieval
from .attention import jagged_attention
from .dropout import dropout
from .embedding import embedding_bag, empty_table, table_batched_embedding, tbe_backward_update_
from .loss import softmax_cross_entropy
from .retrieval import topk_scores

FAMILY_IMPLS = {
    "embedding": _embedding.IMPLS,
    "attention": _attention.IMPLS,
    "loss": _loss.IMPLS,
    "retrieval": _retrieval.IMPLS,
    "dropout": _dropout.IMPLS,
}
IMPLS = ("auto", "cpp", "cuda", "triton", "reference")


def resolve_impl(impl: str, family: str) -> str:
    """The backend of op family ``family`` for the model-wide choice ``impl``: ``impl`` itself when the
    family has it, else "auto". ValueError naming ``impl`` / ``family`` for an unknown one."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if family not in FAMILY_IMPLS:
        raise ValueError(f"family must be one of {sorted(FAMILY_IMPLS)}, got {family!r}")
    return impl if impl in FAMILY_IMPLS[family] else "auto"


__all__ = [
    "table_batched_embedding",
    "embedding_bag",
    "tbe_backward_update_",
    "empty_table",
    "jagged_attention",
    "topk_scores",
    "softmax_cross_entropy",
    "dropout",
    "resolve_impl",
    "FAMILY_IMPLS",
    "IMPLS",
]

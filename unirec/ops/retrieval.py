"""Top-k retrieval over the whole catalogue without the [B, N] score matrix.

Compiled op: ``torch.ops.unirec.topk_scores`` -- CPU C++ (csrc/cpu/retrieval.cpp)
and CUDA C++ (csrc/cuda/retrieval.cu), chosen by the tensors' device.
"""
from typing import Optional, Tuple

import torch

from ._checks import same_device
from .reference.retrieval import topk_scores_ref

IMPLS = ("auto", "cpp", "cuda", "reference")


@torch.library.register_fake("unirec::topk_scores")
def _topk_fake(queries, items, k, item_bias, exclude_offsets, exclude_indices):
    same_device("queries", queries, items=items, item_bias=item_bias, exclude_offsets=exclude_offsets,
                exclude_indices=exclude_indices)
    B = queries.shape[0]
    return queries.new_empty(B, k), queries.new_empty(B, k, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    queries, items, k, item_bias, _, _ = inputs
    ctx.has_bias = item_bias is not None
    ctx.n_items = items.shape[0]
    ctx.save_for_backward(queries, items, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_values, grad_indices):
    # values[b, j] = <q_b, items[i]> + bias[i] with i = indices[b, j]; the
    # (-inf, -1) tail has no input and gets no gradient.
    queries, items, indices = ctx.saved_tensors
    valid = indices >= 0
    idx = indices.clamp_min(0)
    g = torch.where(valid, grad_values, torch.zeros((), dtype=grad_values.dtype, device=grad_values.device))
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    g = g.to(acc)
    dq = di = db = None
    if ctx.needs_input_grad[0]:
        dq = torch.einsum("bk,bkd->bd", g, items.to(acc)[idx]).to(queries.dtype)
    if ctx.needs_input_grad[1]:
        di = torch.zeros(items.shape, dtype=acc, device=items.device)
        di.index_add_(0, idx.reshape(-1), (g[:, :, None] * queries.to(acc)[:, None, :]).reshape(-1, items.shape[1]))
        di = di.to(items.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = torch.zeros(ctx.n_items, dtype=acc, device=items.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        db = db.to(queries.dtype)
    return dq, di, None, db, None, None


torch.library.register_autograd("unirec::topk_scores", _backward, setup_context=_setup_context)


def topk_scores(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    item_bias: Optional[torch.Tensor] = None,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best items per query by score, without storing all B x N scores.

        score[b, i] = <queries[b], items[i]> + item_bias[i]

    over the items i not in query b's exclusion list
    ``exclude_indices[exclude_offsets[b] : exclude_offsets[b + 1]]``.

    Args:
        queries: [B, D] float32/bfloat16 (float64 on CPU).
        items: [N, D], queries' dtype.
        k: >= 1; k > N (or more than the items left) gives a tail of
            value -inf and index -1.
        item_bias: optional [N], queries' dtype.
        exclude_offsets: optional [B + 1] int64, CSR offsets from 0 to nnz.
        exclude_indices: [nnz] int64 item ids in [0, N) (duplicates allowed).
        impl: "auto" (the compiled kernel of the tensors' device), "cpp",
            "cuda", or "reference" (matmul, mask, torch.topk).

    Returns:
        (values [B, k] in queries' dtype, descending; indices [B, k] int64),
        equal scores ordered by the smaller item index. Scores accumulate in
        float32 (float64 for float64); on CUDA, bfloat16 scores come from a
        bfloat16 GEMM with float32 accumulation and a float32 output.
        values is differentiable in queries, items and item_bias. Items
        with a NaN score are never returned on the CPU; on CUDA their order is
        unspecified.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp" and queries.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but queries is on {queries.device}")
    if impl == "cuda" and queries.device.type != "cuda":
        raise ValueError(f"impl='cuda' runs on CUDA tensors, but queries is on {queries.device}")
    if impl == "reference":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return topk_scores_ref(queries, items, k, item_bias, exclude_offsets, exclude_indices)
    return torch.ops.unirec.topk_scores(queries, items, int(k), item_bias, exclude_offsets, exclude_indices)

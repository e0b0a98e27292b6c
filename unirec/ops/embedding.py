"""Table-batched embedding bags: T embedding tables looked up and pooled in one call.

The compiled op is ``torch.ops.unirec.tbe_forward`` (CPU C++ and CUDA C++,
chosen by the tensors' device); its backward is ``tbe_backward`` and the fused
backward + optimizer step is ``tbe_backward_update_``.
"""
from typing import Optional

import torch

from .._ext import _C
from ._checks import same_device
from .reference.embedding import tbe_forward_ref

IMPLS = ("auto", "cpp", "cuda", "reference")


def empty_table(rows: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialised [rows, dim] tensor to hold embedding rows.

    On a Linux CPU, a table of 16 MiB or more is backed by transparent huge
    pages (2 MiB) where the kernel allows: lookups of random rows then miss
    the TLB far less (benchmarks/RESULTS.md, embedding). Fill it before use (e.g. ``normal_``): the
    advice applies to pages not yet touched. ``UNIREC_HUGE_PAGES=0`` turns it
    off; elsewhere this is ``torch.empty``.
    """
    table = torch.empty(rows, dim, dtype=dtype, device=device)
    if table.device.type == "cpu" and table.numel() > 0:
        _C.advise_huge_pages(table.data_ptr(), table.nbytes)
    return table


@torch.library.register_fake("unirec::tbe_forward")
def _tbe_forward_fake(weight, table_offsets, indices, offsets, per_sample_weights, pooling):
    same_device("weight", weight, table_offsets=table_offsets, indices=indices, offsets=offsets,
                per_sample_weights=per_sample_weights)
    T = table_offsets.shape[0] - 1
    B = (offsets.shape[0] - 1) // T
    return weight.new_empty(B, T, weight.shape[1])


@torch.library.register_fake("unirec::tbe_backward")
def _tbe_backward_fake(grad_output, weight, table_offsets, indices, offsets, per_sample_weights, pooling):
    same_device("weight", weight, grad_output=grad_output, table_offsets=table_offsets, indices=indices,
                offsets=offsets, per_sample_weights=per_sample_weights)
    n = indices.shape[0] if per_sample_weights is not None else 0
    return torch.empty_like(weight), weight.new_empty(n)


@torch.library.register_fake("unirec::tbe_backward_update_")
def _tbe_backward_update_fake(weight, state, grad_output, table_offsets, indices, offsets, per_sample_weights,
                              pooling, optimizer, lr, eps):
    same_device("weight", weight, grad_output=grad_output, table_offsets=table_offsets, indices=indices,
                offsets=offsets, per_sample_weights=per_sample_weights,
                optimizer_state=state if optimizer == "rowwise_adagrad" else None)
    n = indices.shape[0] if per_sample_weights is not None else 0
    return weight.new_empty(n)


def _setup_context(ctx, inputs, output):
    weight, table_offsets, indices, offsets, per_sample_weights, pooling = inputs
    ctx.pooling = pooling
    ctx.save_for_backward(weight, table_offsets, indices, offsets, per_sample_weights)


def _backward(ctx, grad_output):
    weight, table_offsets, indices, offsets, per_sample_weights = ctx.saved_tensors
    grad_weight, grad_psw = torch.ops.unirec.tbe_backward(
        grad_output.contiguous(), weight, table_offsets, indices, offsets, per_sample_weights, ctx.pooling
    )
    return (
        grad_weight if ctx.needs_input_grad[0] else None,
        None,
        None,
        None,
        grad_psw if per_sample_weights is not None and ctx.needs_input_grad[4] else None,
        None,
    )


torch.library.register_autograd("unirec::tbe_forward", _backward, setup_context=_setup_context)


def _check_impl(impl: str, device: torch.device) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but weight is on {device}")
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl='cuda' runs on CUDA tensors, but weight is on {device}")


def table_batched_embedding(
    weight: torch.Tensor,
    table_offsets: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    pooling: str = "sum",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Pooled lookups into T tables packed in one weight, in one launch.

    For table t in [0, T) and sample b in [0, B), bag (t, b) is
    ``P = indices[offsets[t*B + b] : offsets[t*B + b + 1]]`` (feature-major,
    FBGEMM's layout) and

        out[b, t, :] = sum_{p in P} w_p * weight[table_offsets[t] + indices[p], :]

    with w_p = per_sample_weights[p] (or 1), divided by |P| for
    ``pooling="mean"``; an empty bag gives zeros.

    Args:
        weight: [R, D] float32/bfloat16/float16 (float64 on CPU), the rows of
            all tables; table t owns rows ``table_offsets[t]:table_offsets[t+1]``.
        table_offsets: [T + 1] int64, from 0 to R.
        indices: [nnz] int64 or int32, row ids local to their table.
        offsets: [T * B + 1], indices' dtype, from 0 to nnz, non-decreasing.
        per_sample_weights: optional [nnz], weight's dtype (sum pooling only).
        pooling: "sum" or "mean".
        impl: "auto" (the compiled kernel of the tensors' device), "cpp",
            "cuda", or "reference" (pure PyTorch).

    Returns:
        [B, T, D] in weight's dtype. Differentiable in weight and
        per_sample_weights.
    """
    _check_impl(impl, weight.device)
    if impl == "reference":
        return tbe_forward_ref(weight, table_offsets, indices, offsets, per_sample_weights, pooling)
    return torch.ops.unirec.tbe_forward(weight, table_offsets, indices, offsets, per_sample_weights, pooling)


def embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """One table: out[b] = pool_{p in indices[offsets[b]:offsets[b+1]]} w_p * weight[indices[p]].

    weight [R, D], indices [nnz], offsets [B + 1] (the last entry is nnz, as
    ``F.embedding_bag(..., include_last_offset=True)``), optional
    per_sample_weights [nnz]; mode "sum" or "mean". Returns [B, D].
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    table_offsets = torch.tensor([0, weight.shape[0]], dtype=torch.long, device=weight.device)
    out = table_batched_embedding(weight, table_offsets, indices, offsets, per_sample_weights, mode, impl=impl)
    return out[:, 0]


def tbe_backward_update_(
    weight: torch.Tensor,
    optimizer_state: torch.Tensor,
    grad_output: torch.Tensor,
    table_offsets: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooling: str,
    optimizer: str,
    lr: float,
    eps: float = 1e-8,
) -> Optional[torch.Tensor]:
    """Backward of ``table_batched_embedding`` fused with an optimizer step on the used rows.

    With g_r the summed gradient of row r (over every position that looked it
    up), updates weight in place:

        sgd:              weight[r] -= lr * g_r
        rowwise_adagrad:  state[r] += mean(g_r ** 2);  weight[r] -= lr * g_r / (sqrt(state[r]) + eps)

    Rows that were not looked up are untouched and no [R, D] gradient is made.
    Returns the gradient of per_sample_weights [nnz] (None without them).
    """
    grad_psw = torch.ops.unirec.tbe_backward_update_(
        weight, optimizer_state, grad_output.contiguous(), table_offsets, indices, offsets, per_sample_weights,
        pooling, optimizer, float(lr), float(eps),
    )
    return grad_psw if per_sample_weights is not None else None

"""Full-catalogue softmax cross-entropy without the [M, N] logits.

Compiled ops: ``torch.ops.unirec.softmax_ce_fwd`` / ``softmax_ce_bwd``. On CPU
tensors they run the C++ kernels (csrc/cpu/loss.cpp); on CUDA tensors the
Triton kernels of ``unirec.ops.triton.loss``, registered here as the ops' CUDA
kernels (triton is imported on first use only).
"""
from typing import Optional

import torch

from .reference.loss import softmax_cross_entropy_ref

IMPLS = ("auto", "cpp", "triton", "reference")
REDUCTIONS = ("mean", "sum", "none")


@torch.library.register_fake("unirec::softmax_ce_fwd")
def _fwd_fake(hidden, items, targets, item_bias, ignore_index, label_smoothing):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    M = hidden.shape[0]
    return hidden.new_empty(M, dtype=acc), hidden.new_empty(M, dtype=acc)


@torch.library.register_fake("unirec::softmax_ce_bwd")
def _bwd_fake(grad_loss, hidden, items, targets, item_bias, lse, ignore_index, label_smoothing):
    return torch.empty_like(hidden), torch.empty_like(items), items.new_empty(items.shape[0])


def _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing, check_values=True):
    """The C++ kernels' checks, for the Triton path (same messages)."""
    if hidden.dim() != 2 or items.dim() != 2:
        raise ValueError(f"hidden and items must be 2-D, got shapes {tuple(hidden.shape)} and {tuple(items.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden must be float32, bfloat16 or float16 for the Triton kernels, got {hidden.dtype}")
    if items.dtype != hidden.dtype:
        raise ValueError(f"items must have the dtype of hidden ({hidden.dtype}), got {items.dtype}")
    if hidden.shape[1] != items.shape[1]:
        raise ValueError(f"hidden [M, D] and items [N, D] must share D, got hidden {tuple(hidden.shape)} "
                         f"and items {tuple(items.shape)}")
    if targets.dim() != 1 or targets.dtype != torch.int64 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be 1-D int64 with M = {hidden.shape[0]} entries, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    for name, t in (("items", items), ("targets", targets), ("item_bias", item_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; all inputs must be on one device")
    if item_bias is not None and (item_bias.dim() != 1 or item_bias.shape[0] != items.shape[0]
                                  or item_bias.dtype != hidden.dtype):
        raise ValueError(f"item_bias must be [N = {items.shape[0]}] of hidden's dtype, got "
                         f"{item_bias.dtype} {tuple(item_bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if hidden.shape[0] > 0 and items.shape[0] == 0:
        raise ValueError("items must have at least one row for a softmax over the catalogue")
    if check_values:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= items.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, N) with N = {items.shape[0]} "
                             f"and is not ignore_index ({ignore_index})")


def _fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing):
    from .triton.loss import softmax_ce_fwd_triton

    _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing)
    return softmax_ce_fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing)


def _bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, ignore_index, label_smoothing):
    from .triton.loss import softmax_ce_bwd_triton

    _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing, check_values=False)
    return softmax_ce_bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, ignore_index, label_smoothing)


torch.library.register_kernel("unirec::softmax_ce_fwd", "cuda", _fwd_triton)
torch.library.register_kernel("unirec::softmax_ce_bwd", "cuda", _bwd_triton)


def _setup_context(ctx, inputs, output):
    hidden, items, targets, item_bias, ignore_index, label_smoothing = inputs
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
    ctx.has_bias = item_bias is not None
    ctx.save_for_backward(hidden, items, targets, item_bias, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_lse):
    hidden, items, targets, item_bias, lse = ctx.saved_tensors
    dh, de, db = torch.ops.unirec.softmax_ce_bwd(grad_loss.contiguous(), hidden, items, targets, item_bias, lse,
                                                 ctx.ignore_index, ctx.label_smoothing)
    return (dh if ctx.needs_input_grad[0] else None, de if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None, None, None)


torch.library.register_autograd("unirec::softmax_ce_fwd", _backward, setup_context=_setup_context)


class _TritonCE(torch.autograd.Function):
    """impl="triton" on any device (CPU tensors run under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, hidden, items, targets, item_bias, ignore_index, label_smoothing):
        loss, lse = _fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing)
        ctx.save_for_backward(hidden, items, targets, item_bias, lse)
        ctx.args = (ignore_index, label_smoothing, item_bias is not None)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, items, targets, item_bias, lse = ctx.saved_tensors
        ignore_index, label_smoothing, has_bias = ctx.args
        dh, de, db = _bwd_triton(grad_loss.contiguous(), hidden, items, targets, item_bias, lse, ignore_index,
                                 label_smoothing)
        return dh, de, None, db if has_bias else None, None, None


def softmax_cross_entropy(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    *,
    item_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue, never storing the logits.

    With z_ij = <hidden_i, items_j> + item_bias_j, lse_i = log sum_j exp(z_ij)
    and eps = label_smoothing,

        loss_i = lse_i - (1 - eps) z_{i, targets_i} - eps/N sum_j z_ij

    (0 where targets_i == ignore_index), which is F.cross_entropy(z, targets)
    row by row. reduction "none" gives [M]; "sum" the sum; "mean" the sum over
    the count of non-ignored rows. Rule for an all-ignored batch: with "mean"
    the loss is 0 (torch gives NaN), with zero gradients, so padding-only
    batches are harmless. Accumulates in float32 (float64 for float64 inputs).

    Args:
        hidden: [M, D] float32/bfloat16 (float64 on CPU), e.g. sequence outputs.
        items: [N, D], hidden's dtype: the item embedding table.
        targets: [M] int64 in [0, N) or ignore_index.
        item_bias: optional [N], hidden's dtype.
        impl: "auto" (C++ on CPU tensors, Triton on CUDA tensors), "cpp",
            "triton" (on CPU tensors under TRITON_INTERPRET=1), "reference".

    Returns:
        A scalar (or [M] for reduction="none") in hidden's dtype, differentiable
        in hidden, items and item_bias.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl == "reference":
        return softmax_cross_entropy_ref(hidden, items, targets, item_bias, ignore_index, reduction, label_smoothing)
    if impl == "cpp" and hidden.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but hidden is on {hidden.device}")
    if impl == "triton":
        per_row, _ = _TritonCE.apply(hidden, items, targets, item_bias, int(ignore_index), float(label_smoothing))
    else:
        per_row, _ = torch.ops.unirec.softmax_ce_fwd(hidden, items, targets, item_bias, int(ignore_index),
                                                     float(label_smoothing))
    if reduction == "none":
        out = per_row
    elif reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row.sum() / (targets != ignore_index).sum().clamp_min(1)
    return out.to(hidden.dtype)

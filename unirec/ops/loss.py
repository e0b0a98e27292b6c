"""Full-catalogue softmax cross-entropy without the [M, N] logits.

Compiled ops: ``torch.ops.unirec.softmax_ce_fwd`` / ``softmax_ce_bwd``. On CPU
tensors they run the C++ kernels (csrc/cpu/loss.cpp); on CUDA tensors the
Triton kernels of ``unirec.ops.triton.loss``, registered here as the ops' CUDA
kernels (triton is imported on first use only).

The CPU kernel has two ways. For a catalogue too large to hold [M, N] floats it
never stores logits and recomputes them in the backward (four GEMMs over the
catalogue per step). When [M, N] fits (``KEEP_LOGIT_GRAD_MAX``) the forward
keeps the logit gradient it has already made, and the backward is two GEMMs:
three in all, the least a step can do, with one pass over the logits instead
of the several of log_softmax + nll and their backwards.
"""
from typing import Optional

import torch

from ._checks import same_device
from .reference.loss import softmax_cross_entropy_ref

IMPLS = ("auto", "cpp", "triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
# The CPU kernel keeps the [M, N] logit gradient from the forward (one GEMM
# fewer in the backward) when it has at most this many entries (128 MB float32).
KEEP_LOGIT_GRAD_MAX = 1 << 25


@torch.library.register_fake("unirec::softmax_ce_fwd")
def _fwd_fake(hidden, items, targets, item_bias, ignore_index, label_smoothing, keep_logit_grad):
    same_device("hidden", hidden, items=items, targets=targets, item_bias=item_bias)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    M, N = hidden.shape[0], items.shape[0]
    return (hidden.new_empty(M, dtype=acc), hidden.new_empty(M, dtype=acc),
            hidden.new_empty(M if keep_logit_grad else 0, N, dtype=acc))


@torch.library.register_fake("unirec::softmax_ce_bwd")
def _bwd_fake(grad_loss, hidden, items, targets, item_bias, lse, logit_grad, ignore_index, label_smoothing):
    same_device("hidden", hidden, grad_loss=grad_loss, items=items, targets=targets, item_bias=item_bias, lse=lse,
                logit_grad=logit_grad)
    return torch.empty_like(hidden), torch.empty_like(items), items.new_empty(items.shape[0])


def _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing, check_values=True):
    """The C++ kernels' checks, for the Triton path (same messages)."""
    if hidden.dim() != 2 or items.dim() != 2:
        raise ValueError(f"hidden and items must be 2-D, got shapes {tuple(hidden.shape)} and {tuple(items.shape)}")
    from .triton.loss import DTYPES

    if hidden.dtype not in DTYPES:
        raise ValueError(f"hidden must be float32 or bfloat16 for the Triton kernels, got {hidden.dtype}")
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


def _fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing, keep_logit_grad=False):
    from .triton.loss import softmax_ce_fwd_triton

    _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing)
    if keep_logit_grad:
        raise ValueError("keep_logit_grad is for the CPU kernel; the Triton kernels always recompute the logits")
    loss, lse = softmax_ce_fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing)
    return loss, lse, lse.new_empty(0, items.shape[0])


def _bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, logit_grad, ignore_index, label_smoothing):
    from .triton.loss import softmax_ce_bwd_triton

    _check_args(hidden, items, targets, item_bias, ignore_index, label_smoothing, check_values=False)
    if logit_grad is not None:
        raise ValueError("logit_grad is for the CPU kernel; the Triton kernels always recompute the logits")
    return softmax_ce_bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, ignore_index, label_smoothing)


torch.library.register_kernel("unirec::softmax_ce_fwd", "cuda", _fwd_triton)
torch.library.register_kernel("unirec::softmax_ce_bwd", "cuda", _bwd_triton)


def _setup_context(ctx, inputs, output):
    hidden, items, targets, item_bias, ignore_index, label_smoothing, keep_logit_grad = inputs
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
    ctx.has_bias = item_bias is not None
    ctx.save_for_backward(hidden, items, targets, item_bias, output[1], output[2] if keep_logit_grad else None)
    ctx.mark_non_differentiable(output[1], output[2])
    # Undefined gradients stay None: no [M, N] of zeros for logit_grad.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, grad_logit_grad):
    if grad_loss is None:
        return None, None, None, None, None, None, None
    hidden, items, targets, item_bias, lse, logit_grad = ctx.saved_tensors
    dh, de, db = torch.ops.unirec.softmax_ce_bwd(grad_loss.contiguous(), hidden, items, targets, item_bias, lse,
                                                 logit_grad, ctx.ignore_index, ctx.label_smoothing)
    return (dh if ctx.needs_input_grad[0] else None, de if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None, None, None, None)


torch.library.register_autograd("unirec::softmax_ce_fwd", _backward, setup_context=_setup_context)


class _TritonCE(torch.autograd.Function):
    """impl="triton" on any device (CPU tensors run under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, hidden, items, targets, item_bias, ignore_index, label_smoothing):
        loss, lse, _ = _fwd_triton(hidden, items, targets, item_bias, ignore_index, label_smoothing)
        ctx.save_for_backward(hidden, items, targets, item_bias, lse)
        ctx.args = (ignore_index, label_smoothing, item_bias is not None)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, items, targets, item_bias, lse = ctx.saved_tensors
        ignore_index, label_smoothing, has_bias = ctx.args
        dh, de, db = _bwd_triton(grad_loss.contiguous(), hidden, items, targets, item_bias, lse, None,
                                 ignore_index, label_smoothing)
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
    keep_logit_grad: Optional[bool] = None,
) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue, its logits made block by block, never stored.

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
        keep_logit_grad: C++ kernel only. True keeps the [M, N] logit
            gradient from the forward for the backward: three GEMMs over the
            catalogue per step instead of four, for M * N floats of memory.
            None (default) keeps it when M * N <= KEEP_LOGIT_GRAD_MAX and
            the rows need a gradient. The Triton kernels always recompute.

    Returns:
        A scalar (or [M] for reduction="none") in hidden's dtype, differentiable
        in hidden, items and item_bias.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    on_cpp = impl == "cpp" or (impl == "auto" and hidden.device.type == "cpu")
    if keep_logit_grad and not on_cpp:
        raise ValueError(f"keep_logit_grad=True needs the C++ kernel (CPU tensors, impl 'auto' or 'cpp'), "
                         f"got impl={impl!r} with hidden on {hidden.device}")
    if impl == "reference":
        return softmax_cross_entropy_ref(hidden, items, targets, item_bias, ignore_index, reduction, label_smoothing)
    if impl == "cpp" and hidden.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but hidden is on {hidden.device}")
    if keep_logit_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, items, item_bias))
        keep_logit_grad = on_cpp and needs_grad and hidden.shape[0] * items.shape[0] <= KEEP_LOGIT_GRAD_MAX
    if impl == "triton":
        per_row, _ = _TritonCE.apply(hidden, items, targets, item_bias, int(ignore_index), float(label_smoothing))
    else:
        per_row, _, _ = torch.ops.unirec.softmax_ce_fwd(hidden, items, targets, item_bias, int(ignore_index),
                                                        float(label_smoothing), bool(keep_logit_grad))
    return reduce_rows(per_row, targets, ignore_index, reduction).to(hidden.dtype)


def reduce_rows(per_row: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """The loss of ``reduction`` from per-row losses: "none" as is, "sum", or "mean" over the rows whose
    target is not ``ignore_index``."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (targets != ignore_index).sum().clamp_min(1)

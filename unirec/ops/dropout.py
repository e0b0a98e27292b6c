"""Dropout with a counter-based mask generator on the CPU.

Compiled op: ``torch.ops.unirec.dropout(input, threshold, seed, row_keys=None)``
(csrc/cpu/dropout.cpp): input * mask * 65536 / threshold in one pass, keep = threshold / 65536. The
mask is a pure function of (seed, element index), or with ``row_keys`` (int64, one per row of the
input viewed as [rows, cols], cols = its last dimension) of (seed, row_keys[r], column): a row's mask
then follows its key wherever the row sits, so a token keyed by (user, position) is dropped alike in
any batch layout and in any process. Exact draws: ``dropout_draws_ref`` and ``row_draws_ref``
(:mod:`unirec.ops.reference.dropout`). The backward is the same op on the incoming gradient with the
same (threshold, seed, row_keys): the mask is regenerated, never stored. On CUDA tensors
``impl="auto"`` uses torch's own dropout, already a fused Philox kernel (row keys ignored).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import same_device
from .reference.dropout import dropout_mask_ref, dropout_ref, row_draws_ref

IMPLS = ("auto", "cpp", "reference")
_BITS = 65536  # the mask compares 16-bit draws


def check_row_keys(input: torch.Tensor, row_keys: Optional[torch.Tensor]) -> None:
    """The C++ kernel's checks of ``row_keys`` (the same, in the same words): int64, 1-D, one entry per row of
    ``input`` viewed as [rows, input.shape[-1]], on ``input``'s device."""
    if row_keys is None:
        return
    if input.dim() < 1:
        raise ValueError("with row_keys, input must have at least 1 dimension (rows = input.numel() / "
                         "input.shape[-1]), got a 0-D tensor")
    if row_keys.dtype != torch.int64:
        raise ValueError(f"row_keys must be int64, got {row_keys.dtype}")
    if row_keys.dim() != 1:
        raise ValueError(f"row_keys must be 1-D, got shape {list(row_keys.shape)}")
    same_device("input", input, row_keys=row_keys)
    rows = 1
    for d in input.shape[:-1]:
        rows *= d
    if row_keys.numel() != rows:
        raise ValueError(f"row_keys must have one entry per row of input (input.numel() / input.shape[-1] = {rows} "
                         f"for input of shape {list(input.shape)}), got {row_keys.numel()}")


@torch.library.register_fake("unirec::dropout")
def _dropout_fake(input, threshold, seed, row_keys=None):
    check_row_keys(input, row_keys)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.threshold, ctx.seed, *rest = inputs  # (row_keys may be absent from the inputs)
    row_keys = rest[0] if rest else None
    ctx.keyed = row_keys is not None
    if ctx.keyed:
        ctx.save_for_backward(row_keys)  # [rows] int64, not the mask


def _backward(ctx, grad_out):
    # d(x * m * s)/dx = m * s: the op itself, on the gradient, under the same seed and row keys.
    if ctx.keyed:
        return torch.ops.unirec.dropout(grad_out, ctx.threshold, ctx.seed, ctx.saved_tensors[0]), None, None, None
    return torch.ops.unirec.dropout(grad_out, ctx.threshold, ctx.seed), None, None, None


torch.library.register_autograd("unirec::dropout", _backward, setup_context=_setup_context)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, *, impl: str = "auto",
            row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = x * m / keep with m ~ Bernoulli(keep), keep = 1 - p (rounded to a multiple of 2^-16),
    in training; x unchanged otherwise.

    On CPU tensors the mask comes from a counter-based hash under a seed drawn from torch's default
    CPU generator (one draw per call), so ``torch.manual_seed`` makes runs repeat. Without
    ``row_keys`` element i's draw depends on (seed, i) (definition: ``dropout_mask_ref``); with them,
    element (r, c) of x viewed as [rows, cols] depends on (seed, row_keys[r], c) only
    (``row_draws_ref``), so rows with the same key get the same mask in any order or tensor.
    Gradient: grad * m / keep, with the mask regenerated from the seed (and keys).

    Args:
        x: any shape, a floating dtype. p: drop probability in [0, 1].
        impl: "auto" (the C++ kernel on CPU tensors, ``F.dropout`` elsewhere), "cpp" (CPU only),
            "reference" (``F.dropout``).
        row_keys: optional int64 [x.numel() / x.shape[-1]] keys of the rows, on x's device. Only the
            C++ kernel uses them: ``impl="reference"`` and CUDA tensors (``F.dropout``, torch's
            generator) ignore them after the checks.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if impl == "cpp" and x.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but x is on {x.device}")
    check_row_keys(x, row_keys)
    if not training or p == 0.0:
        return x
    if impl == "reference" or x.device.type != "cpu":
        return F.dropout(x, p, True)
    threshold = round((1.0 - p) * _BITS)
    if threshold == 0:
        return x * 0.0
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    if row_keys is None:
        return torch.ops.unirec.dropout(x, threshold, seed)
    return torch.ops.unirec.dropout(x, threshold, seed, row_keys)


__all__ = ["dropout", "dropout_mask_ref", "dropout_ref", "row_draws_ref"]

"""Dropout with a counter-based mask generator on the CPU.

Compiled op: ``torch.ops.unirec.dropout(input, threshold, seed)`` (csrc/cpu/dropout.cpp):
input * mask * 65536 / threshold in one pass, the mask a pure function of (seed, element index). The
backward is the same op on the incoming gradient with the same (threshold, seed): the mask is
regenerated, never stored. On CUDA tensors ``impl="auto"`` uses torch's own dropout, already a fused
Philox kernel.
"""
import torch
import torch.nn.functional as F

from .reference.dropout import dropout_mask_ref, dropout_ref

IMPLS = ("auto", "cpp", "reference")
_BITS = 65536  # the mask compares 16-bit draws


@torch.library.register_fake("unirec::dropout")
def _dropout_fake(input, threshold, seed):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.threshold, ctx.seed = inputs


def _backward(ctx, grad_out):
    # d(x * m * s)/dx = m * s: the op itself, on the gradient, under the same seed.
    return torch.ops.unirec.dropout(grad_out, ctx.threshold, ctx.seed), None, None


torch.library.register_autograd("unirec::dropout", _backward, setup_context=_setup_context)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, *, impl: str = "auto") -> torch.Tensor:
    """out = x * m / keep with m_i ~ Bernoulli(keep), keep = 1 - p (rounded to a multiple of 2^-16),
    in training; x unchanged otherwise.

    On CPU tensors the mask comes from a counter-based hash under a seed drawn from torch's default
    CPU generator, so ``torch.manual_seed`` makes runs repeat (definition: ``dropout_mask_ref``).
    Gradient: grad * m / keep, with the mask regenerated from the seed.

    Args:
        x: any shape, a floating dtype. p: drop probability in [0, 1].
        impl: "auto" (the C++ kernel on CPU tensors, ``F.dropout`` elsewhere), "cpp" (CPU only),
            "reference" (``F.dropout``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    if impl == "cpp" and x.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but x is on {x.device}")
    if not training or p == 0.0:
        return x
    if impl == "reference" or x.device.type != "cpu":
        return F.dropout(x, p, True)
    threshold = round((1.0 - p) * _BITS)
    if threshold == 0:
        return x * 0.0
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    return torch.ops.unirec.dropout(x, threshold, seed)


__all__ = ["dropout", "dropout_mask_ref", "dropout_ref"]

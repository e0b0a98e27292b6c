"""Dropout with a counter-based mask generator on the CPU.

Compiled op: ``torch.ops.unirec.dropout_fwd`` (csrc/cpu/dropout.cpp): mask and output in one pass;
the backward is grad * mask. On CUDA tensors ``impl="auto"`` uses torch's own dropout, already a
fused Philox kernel.
"""
import torch
import torch.nn.functional as F

from .reference.dropout import dropout_mask_ref

IMPLS = ("auto", "cpp", "reference")
_BITS = 65536  # the mask compares 16-bit draws


@torch.library.register_fake("unirec::dropout_fwd")
def _fwd_fake(input, threshold, seed):
    like = lambda: torch.empty_like(input, memory_format=torch.contiguous_format)  # noqa: E731
    return like(), like()


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_mask):
    (mask,) = ctx.saved_tensors
    return grad_out * mask, None, None


torch.library.register_autograd("unirec::dropout_fwd", _backward, setup_context=_setup_context)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, *, impl: str = "auto") -> torch.Tensor:
    """out = x * m / keep with m_i ~ Bernoulli(keep), keep = 1 - p (rounded to a multiple of 2^-16),
    in training; x unchanged otherwise.

    The mask comes from SplitMix64 counters under a seed drawn from torch's default CPU generator, so
    ``torch.manual_seed`` makes runs repeat. Gradient: grad * m / keep.

    Args:
        x: any shape, a floating dtype. p: drop probability in [0, 1].
        impl: "auto" (the C++ mask on CPU tensors, ``F.dropout`` elsewhere), "cpp" (CPU only),
            "reference" (``F.dropout``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
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
    return torch.ops.unirec.dropout_fwd(x, threshold, seed)[0]


__all__ = ["dropout", "dropout_mask_ref"]

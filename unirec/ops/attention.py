"""Jagged attention: fused multi-head attention over packed variable-length sequences.

The compiled ops are ``torch.ops.unirec.jagged_attention_fwd`` / ``_bwd``: the
CPU kernel is C++ (csrc/cpu/attention.cpp); on CUDA tensors the ops run the
Triton kernels of ``unirec.ops.triton.attention`` (registered below with
``torch.library.register_kernel``, Triton is imported on first use only).
"""
import math
import os
from typing import Optional

import torch

from ._checks import same_device
from .reference.attention import jagged_attention_ref

IMPLS = ("auto", "cpp", "triton", "reference")
ACTIVATIONS = ("softmax", "silu")


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("unirec::jagged_attention_fwd")
def _fwd_fake(q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
    same_device("q", q, k=k, v=v, offsets=offsets, num_targets=num_targets, rel_bias=rel_bias)
    lse_shape = (q.shape[0], q.shape[1]) if activation == "softmax" else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=_lse_dtype(q))


@torch.library.register_fake("unirec::jagged_attention_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
    same_device("q", q, grad_out=grad_out, k=k, v=v, out=out, lse=lse, offsets=offsets, num_targets=num_targets,
                rel_bias=rel_bias)
    drb = torch.empty_like(rel_bias) if rel_bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drb


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale = inputs
    out, lse = output
    ctx.args = (max_seqlen, causal, activation, scale)
    ctx.save_for_backward(q, k, v, out, lse, offsets, num_targets, rel_bias)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, offsets, num_targets, rel_bias = ctx.saved_tensors
    max_seqlen, causal, activation, scale = ctx.args
    dq, dk, dv, drb = torch.ops.unirec.jagged_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale
    )
    return dq, dk, dv, None, None, None, None, None, (drb if rel_bias is not None else None), None


torch.library.register_autograd("unirec::jagged_attention_fwd", _backward, setup_context=_setup_context)


@torch.library.register_kernel("unirec::jagged_attention_fwd", "cuda")
def _fwd_cuda(q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
    from .triton.attention import jagged_attention_fwd_triton

    return jagged_attention_fwd_triton(q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale)


@torch.library.register_kernel("unirec::jagged_attention_bwd", "cuda")
def _bwd_cuda(grad_out, q, k, v, out, lse, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
    from .triton.attention import jagged_attention_bwd_triton

    return jagged_attention_bwd_triton(grad_out, q, k, v, out, lse, offsets, max_seqlen, causal, num_targets,
                                       activation, rel_bias, scale)


class _TritonAttention(torch.autograd.Function):
    """impl="triton" on any device (on CPU tensors under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
        from .triton.attention import jagged_attention_fwd_triton

        out, lse = jagged_attention_fwd_triton(q, k, v, offsets, max_seqlen, causal, num_targets, activation,
                                               rel_bias, scale)
        ctx.args = (max_seqlen, causal, activation, scale)
        ctx.save_for_backward(q, k, v, out, lse, offsets, num_targets, rel_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton.attention import jagged_attention_bwd_triton

        q, k, v, out, lse, offsets, num_targets, rel_bias = ctx.saved_tensors
        max_seqlen, causal, activation, scale = ctx.args
        dq, dk, dv, drb = jagged_attention_bwd_triton(grad_out.contiguous(), q, k, v, out, lse, offsets, max_seqlen,
                                                      causal, num_targets, activation, rel_bias, scale)
        return dq, dk, dv, None, None, None, None, None, (drb if rel_bias is not None else None), None


def jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    activation: str = "softmax",
    rel_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-head attention within each of B sequences packed back to back, without padding.

    Sequence b is rows ``offsets[b]:offsets[b+1]`` of q, k, v. Within it, for
    head h, with scale defaulting to 1/sqrt(Dh),

        s_ij = scale * <q_ih, k_jh> + rel_bias[h, |i - j|]      (bias optional)
        softmax: out_ih = sum_{j in V(i)} softmax_j(s_ij) v_jh
        silu:    out_ih = sum_{j in V(i)} silu(s_ij) v_jh / max_seqlen   (HSTU)

    Visibility V(i): with ``causal`` j <= i, else every j. With ``num_targets``
    the last num_targets[b] tokens of sequence b are targets (candidates): a
    target sees every non-target and itself, no other target; a non-target
    never sees a target. No token sees another sequence.

    Args:
        q, k, v: [total, H, Dh] float32/bfloat16 (float64 on CPU).
        offsets: [B + 1] int64, from 0 to total, non-decreasing.
        max_seqlen: int >= every length (silu divides by it; rel_bias is this long).
        causal: causal mask (default True).
        num_targets: optional [B] int64, 0 <= num_targets[b] <= length of b.
        activation: "softmax" or "silu".
        rel_bias: optional [H, max_seqlen], q's dtype (differentiable).
        scale: score scale, default 1/sqrt(Dh).
        impl: "auto" (C++ on CPU, Triton on CUDA), "cpp", "triton", or "reference".

    Returns:
        [total, H, Dh] in q's dtype; differentiable in q, k, v and rel_bias.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation must be "softmax" or "silu", got {activation!r}')
    if impl == "cpp" and q.device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors, but q is on {q.device}")
    if q.dim() != 3 or q.shape[2] < 1:
        raise ValueError(f"q must be [total, H, Dh] with Dh >= 1, got shape {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    max_seqlen = int(max_seqlen)
    if impl == "reference":
        return jagged_attention_ref(q, k, v, offsets, max_seqlen, causal=causal, num_targets=num_targets,
                                    activation=activation, rel_bias=rel_bias, scale=scale)
    if impl == "triton":
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError("impl='triton' on CPU tensors runs under Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before triton is imported")
        return _TritonAttention.apply(q, k, v, offsets, max_seqlen, bool(causal), num_targets, activation, rel_bias,
                                      scale)
    out, _ = torch.ops.unirec.jagged_attention_fwd(q, k, v, offsets, max_seqlen, bool(causal), num_targets,
                                                   activation, rel_bias, scale)
    return out

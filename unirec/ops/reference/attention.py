"""Jagged attention in plain PyTorch: pad, mask, compute in float32 (float64 for float64 inputs)."""
import math
from typing import Optional

import torch


def jagged_attention_mask(offsets: torch.Tensor, max_seqlen: int, causal: bool = True,
                          num_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean visibility [B, N, N] (N = max_seqlen) of the padded batch: mask[b, i, j] is True when token i
    of sequence b sees token j. Padded rows see only themselves (so softmax stays finite); padded columns are
    seen by no real token."""
    B = offsets.numel() - 1
    N = max_seqlen
    dev = offsets.device
    lengths = (offsets[1:] - offsets[:-1]).to(torch.long)
    nt = torch.zeros(B, dtype=torch.long, device=dev) if num_targets is None else num_targets.to(torch.long)
    t0 = (lengths - nt)[:, None, None]
    ar = torch.arange(N, device=dev)
    i = ar[None, :, None]
    j = ar[None, None, :]
    nontarget_j = j < t0
    see = nontarget_j & ((j <= i) if causal else torch.ones_like(nontarget_j))
    see = see | (i >= t0) & nontarget_j  # a target sees every non-target
    see = see | ((i == j) & (i >= t0))   # and itself
    valid = (ar[None, :] < lengths[:, None])
    see = see & valid[:, :, None] & valid[:, None, :]
    see = see | ((i == j) & ~valid[:, :, None])
    return see


def pad_jagged(x: torch.Tensor, offsets: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[total, ...] -> [B, max_seqlen, ...], zero padded."""
    B = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    out = x.new_zeros((B, max_seqlen) + tuple(x.shape[1:]))
    idx = torch.arange(max_seqlen, device=x.device)[None, :]
    valid = idx < lengths[:, None]
    out[valid] = x
    return out


def unpad_jagged(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, N, ...] -> [total, ...]."""
    lengths = offsets[1:] - offsets[:-1]
    idx = torch.arange(x.shape[1], device=x.device)[None, :]
    return x[idx < lengths[:, None]]


def jagged_attention_ref(q, k, v, offsets, max_seqlen, *, causal=True, num_targets=None, activation="softmax",
                         rel_bias=None, scale=None):
    """What ``unirec.ops.jagged_attention`` computes, by padding to [B, H, N, Dh] (differentiable)."""
    if activation not in ("softmax", "silu"):
        raise ValueError(f'activation must be "softmax" or "silu", got {activation!r}')
    N = int(max_seqlen)
    Dh = q.shape[-1]
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qp, kp, vp = (pad_jagged(t.to(cdt), offsets, N).transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
    s = scale * (qp @ kp.transpose(-1, -2))
    if rel_bias is not None:
        ar = torch.arange(N, device=q.device)
        s = s + rel_bias.to(cdt)[:, (ar[:, None] - ar[None, :]).abs()][None]
    mask = jagged_attention_mask(offsets, N, causal, num_targets)[:, None]
    if activation == "softmax":
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    else:
        p = torch.nn.functional.silu(s).masked_fill(~mask, 0.0) / N
    out = (p @ vp).transpose(1, 2)
    return unpad_jagged(out, offsets).to(q.dtype)

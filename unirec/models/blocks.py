"""Transformer blocks over packed (jagged) token streams, built on unirec.ops.jagged_attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import Dropout


class JaggedSelfAttention(nn.Module):
    """Multi-head self-attention within each packed sequence, causal unless ``causal=False`` (which
    lets every token see its whole sequence, as a masked-item objective needs).

    ``activation="softmax"``: standard attention, out = W_o(attn(q, k, v)).
    ``activation="silu"``: HSTU-style pointwise attention with a gate u and an
    optional relative position bias [H, max_seqlen]: out = W_o(LN(attn) * silu(u)).
    ``impl``: the backend choice (see :func:`unirec.ops.resolve_impl`), set at run time by
    :func:`unirec.nn.set_impl`.

    forward(x [T, D], offsets [B + 1], num_targets [B] or None, causal=True, row_keys=None, rows=None)
    -> [T, D], or [R, D] for the tokens ``rows`` (int64 [R]) alone: every token is still a key and a value,
    the rest (the output projection, the gate) runs on those rows only; ``row_keys`` (int64, one per output
    row) key the dropout masks (see :class:`unirec.nn.Dropout`).
    """

    def __init__(self, dim: int, num_heads: int, max_seqlen: int, activation: str = "softmax",
                 rel_bias: bool = False, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.max_seqlen, self.activation, self.impl = max_seqlen, activation, impl
        self.qkv = nn.Linear(dim, (4 if activation == "silu" else 3) * dim)
        self.out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim) if activation == "silu" else None
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, max_seqlen)) if rel_bias else None
        self.dropout = Dropout(dropout, impl)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, num_targets: Optional[torch.Tensor] = None,
                causal: bool = True, row_keys: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None):
        T = x.shape[0]
        parts = self.qkv(x).view(T, -1, self.num_heads, self.head_dim).unbind(1)
        q, k, v = (p.contiguous() for p in parts[:3])
        rel = None if self.rel_bias is None else self.rel_bias.to(q.dtype)
        a = ops.jagged_attention(q, k, v, offsets, self.max_seqlen, causal=causal, num_targets=num_targets,
                                 activation=self.activation, rel_bias=rel, impl=ops.resolve_impl(self.impl, "attention")).reshape(T, self.dim)
        u = parts[3].reshape(T, self.dim) if self.activation == "silu" else None
        if rows is not None:
            a, u = a.index_select(0, rows), None if u is None else u.index_select(0, rows)
        if u is not None:
            a = self.attn_norm(a) * F.silu(u)
        return self.out(self.dropout(a, row_keys))


class Block(nn.Module):
    """Pre-norm block: x + Drop(Attn(LN(x))), then x + Drop(FFN(LN(x))), FFN = Linear, GELU, Dropout,
    Linear (``ffn.0`` .. ``ffn.3``). Shapes, ``row_keys`` (every dropout's) and ``rows`` (the tokens whose
    output is wanted; None = all) as JaggedSelfAttention."""

    def __init__(self, dim: int, num_heads: int, max_seqlen: int, ffn_mult: int = 2, dropout: float = 0.2,
                 activation: str = "softmax", rel_bias: bool = False, impl: str = "auto"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = JaggedSelfAttention(dim, num_heads, max_seqlen, activation, rel_bias, dropout, impl)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), Dropout(dropout, impl),
                                 nn.Linear(ffn_mult * dim, dim))
        self.drop = Dropout(dropout, impl)

    def forward(self, x, offsets, num_targets=None, causal: bool = True, row_keys: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None):
        y = self.norm1(x)
        if rows is not None:
            x = x.index_select(0, rows)
            row_keys = None if row_keys is None else row_keys.index_select(0, rows)
        x = x + self.drop(self.attn(y, offsets, num_targets, causal, row_keys, rows), row_keys)
        up, act, drop, down = self.ffn  # called one by one, so that the inner dropout gets the keys
        return x + self.drop(down(drop(act(up(self.norm2(x))), row_keys)), row_keys)

"""Reference table-batched embedding bags, differentiable through autograd."""
from typing import Optional

import torch


def tbe_forward_ref(
    weight: torch.Tensor,
    table_offsets: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    pooling: str = "sum",
) -> torch.Tensor:
    """out[b, t] = pool_{p in bag (t, b)} psw[p] * weight[table_offsets[t] + indices[p]].

    Accumulates in float32 (float64 for float64 weights); returns [B, T, D] in
    weight's dtype.
    """
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    D = weight.shape[1]
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(T * B, device=weight.device), lengths)
    rows = indices.long() + table_offsets[bag // B] if B > 0 else indices.long()
    vals = weight[rows].to(acc_dtype)
    if per_sample_weights is not None:
        vals = vals * per_sample_weights.to(acc_dtype)[:, None]
    out = torch.zeros(T * B, D, dtype=acc_dtype, device=weight.device).index_add(0, bag, vals)
    if pooling == "mean":
        out = out / lengths.clamp(min=1).to(acc_dtype)[:, None]
    return out.view(T, B, D).transpose(0, 1).to(weight.dtype)


def embedding_bag_ref(weight, indices, offsets, per_sample_weights=None, mode="sum"):
    """The one-table case: out[b] = pool_{p in bag b} psw[p] * weight[indices[p]], [B, D]."""
    table_offsets = torch.tensor([0, weight.shape[0]], device=weight.device)
    return tbe_forward_ref(weight, table_offsets, indices, offsets, per_sample_weights, mode)[:, 0]

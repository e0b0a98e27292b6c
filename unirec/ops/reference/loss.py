"""Reference full-catalogue softmax cross-entropy: materialised logits and F.cross_entropy."""
from typing import Optional

import torch
import torch.nn.functional as F


def softmax_cross_entropy_ref(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    item_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """F.cross_entropy(hidden @ items.T + item_bias, targets) computed in
    float32 (float64 for float64 inputs), returned in hidden's dtype.

    One rule differs from torch: with reduction="mean" and every row ignored
    the loss is 0 (torch gives NaN), so a batch of padding adds nothing.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ items.to(acc).T
    if item_bias is not None:
        logits = logits + item_bias.to(acc)
    per_row = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    if reduction == "none":
        out = per_row
    elif reduction == "sum":
        out = per_row.sum()
    elif reduction == "mean":
        out = per_row.sum() / (targets != ignore_index).sum().clamp_min(1)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return out.to(hidden.dtype)

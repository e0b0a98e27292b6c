"""Reference top-k retrieval: the full score matrix, a mask, and torch.topk."""
from typing import Optional, Tuple

import torch

_EXCLUDED = -(2**63)


def order_keys(scores: torch.Tensor, excluded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys whose order is (score, then smaller index): float32 score bits
    in the high half (made order-preserving as signed int32), 2^32-1-index in
    the low half. torch.topk on these keys is deterministic and breaks ties by
    the smaller index. Excluded entries get the smallest int64."""
    s = scores.float() + 0.0  # -0.0 -> +0.0, so both zeros tie
    bits = s.view(torch.int32)
    hi = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    idx = torch.arange(s.shape[-1], device=s.device, dtype=torch.long)
    keys = hi * (2**32) + (2**32 - 1 - idx)
    if excluded is not None:
        keys = keys.masked_fill(excluded, _EXCLUDED)
    return keys


def topk_scores_ref(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    item_bias: Optional[torch.Tensor] = None,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores = queries @ items.T + item_bias in float32 (float64 for float64
    inputs), excluded (query, item) pairs removed, the k best per query with
    ties going to the smaller item index; a tail of (-inf, -1) when fewer than
    k remain. Returns (values [B, k] in queries' dtype, indices [B, k] int64).

    Stores the whole [B, N] matrix: this defines the result, it is not fast.
    """
    B, N = queries.shape[0], items.shape[0]
    dev = queries.device
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    scores = queries.to(acc) @ items.to(acc).T
    if item_bias is not None:
        scores = scores + item_bias.to(acc)
    excluded = torch.zeros(B, N, dtype=torch.bool, device=dev)
    if exclude_offsets is not None:
        lengths = exclude_offsets[1:] - exclude_offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(B, device=dev), lengths)
        excluded[rows, exclude_indices] = True
    kk = min(k, N)
    if acc == torch.float32:
        keys = order_keys(scores, excluded)
        top = torch.topk(keys, kk, dim=1).values
        idx = (2**32 - 1) - (top & (2**32 - 1))
        drop = top == _EXCLUDED
    else:
        # float64 does not fit a key: a stable descending sort keeps equal
        # scores in index order, and a second stable sort moves excluded last.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort(excluded.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
        idx = order[:, :kk]
        drop = excluded.gather(1, idx)
    idx = idx.masked_fill(drop, 0)
    vals = scores.gather(1, idx).masked_fill(drop, float("-inf"))
    idx = idx.masked_fill(drop, -1)
    values = torch.full((B, k), float("-inf"), dtype=acc, device=dev)
    indices = torch.full((B, k), -1, dtype=torch.long, device=dev)
    values[:, :kk] = vals
    indices[:, :kk] = idx
    return values.to(queries.dtype), indices

"""Evaluation metrics (docs/protocol.md), in torch.

Ranking (full ranking over the catalogue, one target per user):

- the target's rank is pessimistic: ``rank = 1 + #{other eligible items i with
  score_i >= score_target}``, so the target is placed after every item tied with
  it (a constant scorer ranks last, not first);
- eligible items: all items except the padding item 0 and, when history is
  masked, the user's history items other than the target;
- NDCG@K = 1 / log2(rank + 1), HR@K = 1, MRR@K = 1 / rank when rank <= K, else 0
  (one relevant item, so the ideal DCG is 1 and HR@K equals Recall@K).

Classification on likes: AUC (Mann-Whitney, ties count one half) and GAUC (per
user AUC weighted by the user's number of samples; users whose samples are all
one class are skipped). Regression: RMSE and MAE.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import torch

DEFAULT_KS = (5, 10, 20)
ScoreSource = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


# --------------------------------------------------------------------------- ranks


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history_items: Optional[torch.Tensor] = None,
                 history_offsets: Optional[torch.Tensor] = None, *, mask_history: bool = True,
                 exclude_padding: bool = True) -> torch.Tensor:
    """Pessimistic 1-based rank of each target among the eligible items.

    Args:
        scores: [B, N] item scores (column 0 is the padding item).
        targets: [B] int64 target items in [0, N) (in [1, N) when exclude_padding).
        history_items: [H] int64 items seen by each user before the target (CSR with history_offsets).
        history_offsets: [B + 1] int64.
        mask_history: drop history items (except the target itself) from the ranking.
        exclude_padding: drop item 0 from the ranking.

    Returns:
        [B] int64 ranks, 1 = best.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    B, N = scores.shape
    targets = targets.reshape(-1).to(device=scores.device, dtype=torch.int64)
    if targets.numel() != B:
        raise ValueError(f"targets must have B = {B} entries, got {targets.numel()}")
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    lo = 1 if exclude_padding else 0
    if int(targets.min()) < lo or int(targets.max()) >= N:
        raise ValueError(f"targets must lie in [{lo}, {N}), got range [{int(targets.min())}, {int(targets.max())}]")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = torch.arange(B, device=scores.device)
    t = scores[rows, targets].unsqueeze(1)
    counted = scores >= t  # [B, N]: items ranked at or above the target (ties go first: pessimistic)
    counted[rows, targets] = False
    if exclude_padding:
        counted[:, 0] = False
    if mask_history and history_items is not None and history_items.numel():
        if history_offsets is None or history_offsets.numel() != B + 1:
            raise ValueError(f"history_offsets must be [B + 1] = [{B + 1}]")
        hist = history_items.to(device=scores.device, dtype=torch.int64)
        lens = torch.diff(history_offsets.to(device=scores.device, dtype=torch.int64))
        hrows = torch.repeat_interleave(rows, lens, output_size=hist.numel())
        counted[hrows, hist] = False  # the target was already uncounted, so a repeat changes nothing
    return 1 + counted.sum(1)


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[B] per-user NDCG@k of one relevant item: 1 / log2(rank + 1) if rank <= k else 0."""
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def hit_rate_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[B] per-user HR@k (= Recall@k with one target): 1 if rank <= k else 0."""
    return (ranks <= k).to(torch.float64)


def mrr_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[B] per-user MRR@k: 1 / rank if rank <= k else 0."""
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / r, torch.zeros_like(r))


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """Means over users of ndcg@k, hr@k, mrr@k for each k (keys like "ndcg@10"); NaN when no users."""
    out = {}
    for k in ks:
        for name, fn in (("ndcg", ndcg_at_k), ("hr", hit_rate_at_k), ("mrr", mrr_at_k)):
            out[f"{name}@{k}"] = float(fn(ranks, k).mean()) if ranks.numel() else math.nan
    return out


class RankingAccumulator:
    """Collects target ranks over batches; ``compute()`` gives the metrics.

    Usage: for each batch, ``acc.add(scores [b, N], targets [b], history_items, history_offsets)``
    (or ``acc.add_ranks(ranks)``), then ``acc.compute()``.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, mask_history: bool = True, exclude_padding: bool = True):
        self.ks, self.mask_history, self.exclude_padding = tuple(ks), mask_history, exclude_padding
        self._ranks = []

    def add(self, scores, targets, history_items=None, history_offsets=None) -> torch.Tensor:
        r = target_ranks(scores, targets, history_items, history_offsets, mask_history=self.mask_history,
                         exclude_padding=self.exclude_padding)
        self._ranks.append(r.cpu())
        return r

    def add_ranks(self, ranks: torch.Tensor) -> None:
        self._ranks.append(ranks.reshape(-1).cpu())

    @property
    def ranks(self) -> torch.Tensor:
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0, dtype=torch.int64)

    def compute(self) -> Dict[str, object]:
        """Metrics plus the protocol: {"ndcg@10": ..., ..., "num_users": B, "mask_history": bool}."""
        out: Dict[str, object] = dict(ranking_metrics(self.ranks, self.ks))
        out["num_users"] = int(self.ranks.numel())
        out["mask_history"] = self.mask_history
        return out


def _csr_slice(items: Optional[torch.Tensor], offsets: Optional[torch.Tensor], start: int, end: int):
    if items is None:
        return None, None
    a, b = int(offsets[start]), int(offsets[end])
    return items[a:b], offsets[start:end + 1] - offsets[start]


def evaluate_full_ranking(scores: ScoreSource, targets: torch.Tensor, history_items: Optional[torch.Tensor] = None,
                          history_offsets: Optional[torch.Tensor] = None, *, mask_history: bool = True,
                          ks: Sequence[int] = DEFAULT_KS, num_items: Optional[int] = None,
                          chunk_size: Optional[int] = None, max_elements: int = 1 << 24,
                          exclude_padding: bool = True, return_ranks: bool = False) -> Dict[str, object]:
    """Full-ranking NDCG/HR/MRR@K of B users, scoring at most ``chunk_size`` users at a time.

    Args:
        scores: a [B, N] tensor, or a function ``(start, end) -> [end - start, N]`` scoring
            users start..end-1 (e.g. :func:`embedding_score_fn`), so B x N is never held at once.
        targets: [B] int64 target items.
        history_items, history_offsets: CSR [H], [B + 1] of each user's history (see target_ranks).
        mask_history: mask history items other than the target (recorded in the result).
        num_items: N, needed with a function when chunk_size is not given.
        chunk_size: users per chunk; default ``max(1, max_elements // N)``.

    Returns:
        {"ndcg@5": ..., "hr@5": ..., "mrr@5": ..., ..., "num_users": B, "mask_history": bool}
        (+ "ranks": [B] int64 when return_ranks).
    """
    B = targets.numel()
    if isinstance(scores, torch.Tensor):
        if scores.shape[0] != B:
            raise ValueError(f"scores has {scores.shape[0]} rows but there are {B} targets")
        N = scores.shape[1]
        tensor = scores
        scores = lambda s, e: tensor[s:e]  # noqa: E731
    else:
        N = num_items
    if chunk_size is None:
        if N is None:
            raise ValueError("pass num_items (or chunk_size) with a score function")
        chunk_size = max(1, max_elements // max(N, 1))
    acc = RankingAccumulator(ks, mask_history, exclude_padding)
    for s in range(0, B, chunk_size):
        e = min(B, s + chunk_size)
        hi, ho = _csr_slice(history_items, history_offsets, s, e)
        acc.add(scores(s, e), targets[s:e], hi, ho)
    out = acc.compute()
    if return_ranks:
        out["ranks"] = acc.ranks
    return out


def embedding_score_fn(queries: torch.Tensor, item_weight: torch.Tensor,
                       item_bias: Optional[torch.Tensor] = None) -> Callable[[int, int], torch.Tensor]:
    """``(start, end) -> queries[start:end] @ item_weight.T (+ item_bias)``: [end - start, N] float32.

    queries: [B, D]; item_weight: [N, D] (row 0 = padding); item_bias: optional [N].
    """
    def fn(start: int, end: int) -> torch.Tensor:
        s = queries[start:end].float() @ item_weight.float().T
        return s + item_bias.float() if item_bias is not None else s
    return fn


# --------------------------------------------------------------------------- classification and regression


def _tie_avg_positions(sorted_keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """1-based positions in a sorted order, averaged over runs where every key is equal."""
    n = sorted_keys[0].numel()
    change = torch.zeros(n, dtype=torch.bool, device=sorted_keys[0].device)
    if n:
        change[0] = True
        for k in sorted_keys:
            change[1:] |= k[1:] != k[:-1]
    run = torch.cumsum(change.to(torch.int64), 0) - 1
    counts = torch.bincount(run)
    start = torch.cumsum(counts, 0) - counts  # 0-based first position of each run
    avg = start.to(torch.float64) + (counts.to(torch.float64) + 1.0) / 2.0
    return avg[run]


def _check_binary(scores, labels):
    scores = scores.reshape(-1).to(torch.float64)
    labels = labels.reshape(-1)
    if scores.numel() != labels.numel():
        raise ValueError(f"scores and labels differ in size: {scores.numel()} vs {labels.numel()}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, labels.to(torch.bool) if labels.dtype == torch.bool else labels != 0


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties counting 1/2.

    scores: [n] float; labels: [n] bool or 0/1. NaN when only one class is present.
    """
    s, y = _check_binary(scores, labels)
    npos = int(y.sum())
    nneg = y.numel() - npos
    if npos == 0 or nneg == 0:
        return math.nan
    sv, order = torch.sort(s, stable=True)
    ranks = _tie_avg_positions([sv])
    rpos = float(ranks[y[order]].sum())
    return (rpos - npos * (npos + 1) / 2.0) / (npos * nneg)


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Group AUC: sum_g n_g AUC_g / sum_g n_g over groups (users) having both classes.

    scores: [n] float; labels: [n] bool or 0/1; groups: [n] int64 group (user) ids.
    n_g is the group's number of samples. NaN when no group has both classes.
    """
    s, y = _check_binary(scores, labels)
    g = groups.reshape(-1).to(torch.int64)
    if g.numel() != s.numel():
        raise ValueError(f"groups has {g.numel()} entries, scores {s.numel()}")
    if s.numel() == 0:
        return math.nan
    # Sort by (group, score): by score first, then stably by group.
    o1 = torch.sort(s, stable=True).indices
    o2 = torch.sort(g[o1], stable=True).indices
    order = o1[o2]
    gs, ss, ys = g[order], s[order], y[order]
    pos = _tie_avg_positions([gs, ss])
    uniq, ginv, gcount = torch.unique_consecutive(gs, return_inverse=True, return_counts=True)
    gstart = (torch.cumsum(gcount, 0) - gcount).to(torch.float64)
    rank_in_group = pos - gstart[ginv]
    G = uniq.numel()
    npos = torch.zeros(G, dtype=torch.float64).index_add_(0, ginv, ys.to(torch.float64))
    rpos = torch.zeros(G, dtype=torch.float64).index_add_(0, ginv, torch.where(ys, rank_in_group, 0.0))
    nneg = gcount.to(torch.float64) - npos
    valid = (npos > 0) & (nneg > 0)
    if not bool(valid.any()):
        return math.nan
    auc_g = (rpos[valid] - npos[valid] * (npos[valid] + 1) / 2) / (npos[valid] * nneg[valid])
    w = gcount[valid].to(torch.float64)
    return float((auc_g * w).sum() / w.sum())


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """sqrt(mean((pred - target)^2)) over [n] values; NaN when n = 0."""
    d = pred.reshape(-1).to(torch.float64) - target.reshape(-1).to(torch.float64)
    return float(torch.sqrt((d * d).mean())) if d.numel() else math.nan


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    """mean(|pred - target|) over [n] values; NaN when n = 0."""
    d = pred.reshape(-1).to(torch.float64) - target.reshape(-1).to(torch.float64)
    return float(d.abs().mean()) if d.numel() else math.nan


def rating_metrics(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """{"rmse", "mae"} of predicted vs true ratings, each [n]."""
    return {"rmse": rmse(pred, target), "mae": mae(pred, target)}


def like_metrics(scores: torch.Tensor, ratings: torch.Tensor, users: torch.Tensor,
                 threshold: float = 4.0) -> Dict[str, float]:
    """{"auc", "gauc"} of like scores against likes = ratings >= threshold; all inputs [n]."""
    likes = ratings.reshape(-1) >= threshold
    return {"auc": auc(scores, likes), "gauc": gauc(scores, likes, users)}

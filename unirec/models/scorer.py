"""The scorer: how a user state ranks items, for evaluation and serving alike.

score(u, i) = <q_u, item_rep[i]> + beta[bucket(d_ui)] when i is in u's history (d_ui = events since
i's last occurrence; repeat-aware scoring, ``repeat_bias``), else <q_u, item_rep[i]>. Every method
takes the item representations as an argument, so the catalogue may grow at run time (rows appended
to ``item_rep``). Whole-catalogue rankings use ``unirec.ops.topk_scores`` and never store B x N.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..distributed import all_gather_rows, rank, sharded_topk_scores
from ..nn.sharded import ShardedRows, item_rows


def recency_bucket(distance: torch.Tensor, num_buckets: int, max_len: int) -> torch.Tensor:
    """floor(log2(1 + min(d, max_len - 1))) clipped to num_buckets - 1, for d >= 0 events back (0 = the
    latest event). Training sees distances up to max_len - 1 only (its window), so an item seen further
    back shares the bucket of the window's far end instead of an offset that never trained."""
    d = distance.clamp(0, max_len - 1).double()
    return torch.floor(torch.log2(1.0 + d)).long().clamp(0, num_buckets - 1)


DEFAULT_DISMISS_DEMOTION = 1.5


def dismissal_demotion(queries: torch.Tensor, unit_items: torch.Tensor, cov: torch.Tensor,
                       dismissed: torch.Tensor, strength: float = DEFAULT_DISMISS_DEMOTION) -> torch.Tensor:
    """[B, N] the score each item loses for users who dismissed an item ("not interested"):
    strength x max(0, cos(item, d))^2 x the standard deviation of the user's scores over the catalogue,
    sqrt(q' C q), so that the demotion is on the scale of each user's scores whatever the model.

    queries [B, D]; unit_items [N, D] L2-normalised item representations of items 1..N; cov [D, D] their
    covariance; dismissed [B, m] 1-based (0 = none), the max taken over each row's m dismissed items.
    """
    q = queries.float()
    spread = torch.sqrt(torch.clamp(((q @ cov) * q).sum(1), min=0.0))                  # [B]
    cos = torch.einsum("bmd,nd->bmn", unit_items[(dismissed - 1).clamp(min=0)], unit_items)
    cos = torch.where((dismissed > 0).unsqueeze(2), cos.clamp_min(0.0), 0.0)
    return strength * spread.unsqueeze(1) * cos.amax(1).square()


def item_covariance(items: torch.Tensor) -> torch.Tensor:
    """[D, D] covariance of item representations [N, D] (a user's score variance over them is q' C q)."""
    centred = items - items.mean(0)
    return centred.T @ centred / max(items.shape[0], 1)


def distinct_history(history_items: torch.Tensor, history_offsets: torch.Tensor):
    """Each row's distinct items and how many events ago each last occurred.

    history_items: [H] item ids (any order of rows' events is time order); history_offsets: [B + 1].
    Returns (rows [U], items [U], distance [U]) with U distinct (row, item) pairs, sorted by (row, item);
    distance = (row length - 1) - position of the item's last occurrence in the row.
    """
    dev = history_items.device
    lens = torch.diff(history_offsets)
    H = history_items.numel()
    rows = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=H)
    pos = torch.arange(H, device=dev) - history_offsets[rows]
    span = int(history_items.max()) + 1 if H else 1
    keys, inv = torch.unique(rows * span + history_items, return_inverse=True)
    last = torch.full((keys.numel(),), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, inv, pos, "amax")
    r = keys // span
    return r, keys % span, lens[r] - 1 - last


class Scorer(nn.Module):
    """Scores, top-k and target ranks of user states against item representations (module docstring).

    ``repeat_bias``: learn the offsets beta [num_buckets] (stored as beta / REPEAT_SCALE); ``max_len``:
    the training window, which bounds the recency buckets. ``impl``: the top-k backend choice
    (see :func:`unirec.ops.resolve_impl`).
    """

    REPEAT_SCALE = 20.0

    def __init__(self, repeat_bias: bool, num_buckets: int, max_len: int, impl: str = "auto"):
        super().__init__()
        self.num_buckets, self.max_len, self.impl = num_buckets, max_len, impl
        # Stored as beta / REPEAT_SCALE: one offset shared by every user has to travel several units,
        # and Adam's steps are about lr in the stored value whatever its scale.
        self.repeat_raw = nn.Parameter(torch.zeros(num_buckets)) if repeat_bias else None

    def repeat_offsets(self) -> Optional[torch.Tensor]:
        """beta [num_buckets]: the score offset of a seen item by recency bucket (None without)."""
        return None if self.repeat_raw is None else self.repeat_raw * self.REPEAT_SCALE

    def _topk(self, queries, items, k, **exclude):
        return ops.topk_scores(queries, items, k, impl=ops.resolve_impl(self.impl, "retrieval"), **exclude)

    def _catalogue_topk(self, queries, item_rep, k, exclude_offsets=None, exclude_indices=None):
        """Top-k of item_rep[1:] for each query (exclusions 0-based). A sharded table: every process's
        queries and exclusions are gathered, :func:`unirec.distributed.sharded_topk_scores` ranks them
        on the shards, each process keeps its own rows."""
        if not isinstance(item_rep, ShardedRows):
            ex = {} if exclude_offsets is None else dict(exclude_offsets=exclude_offsets,
                                                         exclude_indices=exclude_indices)
            return self._topk(queries, item_rep[1:].float(), k, **ex)
        B = queries.shape[0]
        if exclude_offsets is None:
            exclude_offsets = torch.zeros(B + 1, dtype=torch.int64, device=queries.device)
            exclude_indices = torch.zeros(0, dtype=torch.int64, device=queries.device)
        all_q, sizes = all_gather_rows(queries)
        lens, _ = all_gather_rows(torch.diff(exclude_offsets))
        ex_idx, _ = all_gather_rows(exclude_indices)
        ex_off = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=queries.device)
        torch.cumsum(lens, 0, out=ex_off[1:])
        rows, offset = item_rep.without_first_row()
        v, i = sharded_topk_scores(all_q, rows.float(), k, offset=offset, exclude_offsets=ex_off,
                                   exclude_indices=ex_idx)
        start = sum(sizes[:rank()])
        return v[start:start + B], i[start:start + B]

    def history_scores(self, queries: torch.Tensor, item_rep: torch.Tensor, history_items: torch.Tensor,
                       history_offsets: torch.Tensor):
        """Scores of each row's distinct history items, repeat offsets included.

        queries [B, D]; item_rep [N + 1, D]; history CSR (items [H] 1-based, offsets [B + 1]).
        Returns (rows [U], items [U] 1-based, scores [U] float32), sorted by (row, item).
        """
        r, it, d = distinct_history(history_items, history_offsets)
        s = (queries[r].float() * item_rows(item_rep, it).float()).sum(1)
        if self.repeat_raw is not None:
            s = s + self.repeat_offsets().float()[recency_bucket(d, self.num_buckets, self.max_len)]
        return r, it, s

    @torch.no_grad()
    def item_scores(self, queries: torch.Tensor, item_rep: torch.Tensor, items: torch.Tensor,
                    history_items: Optional[torch.Tensor] = None,
                    history_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """score[b, c] = <queries[b], item_rep[items[b, c]]> (+ the repeat offset when items[b, c] is in row
        b's history). queries [B, D], items [B, C] 1-based; returns [B, C] float32."""
        s = torch.einsum("bd,bcd->bc", queries.float(), item_rows(item_rep, items).float())
        sharded = isinstance(item_rep, ShardedRows)  # every process must make the same lookups
        if self.repeat_raw is not None and history_items is not None and (history_items.numel() or sharded):
            r, it, hs = self.history_scores(queries, item_rep, history_items, history_offsets)
            if it.numel():
                span = max(int(it.max()), int(items.max()) if items.numel() else 0) + 1
                keys = r * span + it                                           # sorted
                want = torch.arange(items.shape[0], device=items.device).view(-1, 1) * span + items
                at = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
                seen = keys[at] == want
                s = torch.where(seen, hs[at], s)
        return s

    @torch.no_grad()
    def topk(self, queries: torch.Tensor, item_rep: torch.Tensor, k: int,
             history_items: Optional[torch.Tensor] = None, history_offsets: Optional[torch.Tensor] = None,
             exclude_history: bool = True):
        """Top-k of the whole catalogue for each query.

        queries [B, D]; item_rep [N + 1, D]; history CSR (items [H] 1-based, offsets [B + 1]) or None.
        ``exclude_history`` drops the history's items; otherwise they compete with their repeat offsets
        (the best unseen k and every seen item, merged).
        Returns (scores [B, k] float32, items [B, k] int64 1-based; -inf / -1 past the catalogue).
        """
        has_hist = history_items is not None and (history_items.numel() > 0 or isinstance(item_rep, ShardedRows))
        merge = has_hist and not exclude_history and self.repeat_raw is not None
        ex = dict(exclude_offsets=history_offsets, exclude_indices=history_items - 1) \
            if has_hist and (exclude_history or merge) else {}
        vals, idx = self._catalogue_topk(queries.float(), item_rep, k, **ex)
        if not merge:
            return vals, torch.where(idx >= 0, idx + 1, idx)
        r, it, hs = self.history_scores(queries, item_rep, history_items, history_offsets)
        B = queries.shape[0]
        count = torch.bincount(r, minlength=B)
        start = torch.cumsum(count, 0) - count
        col = torch.arange(r.numel(), device=r.device) - start[r]
        width = int(count.max())
        seen_v = torch.full((B, width), float("-inf"), device=vals.device)
        seen_i = torch.full((B, width), -1, dtype=torch.int64, device=vals.device)
        seen_v[r, col], seen_i[r, col] = hs, it - 1
        v, j = torch.cat([vals, seen_v], 1).topk(k, dim=1)
        i = torch.cat([idx, seen_i], 1).gather(1, j)
        return v, torch.where(i >= 0, i + 1, i)

    @torch.no_grad()
    def target_ranks(self, queries: torch.Tensor, item_rep: torch.Tensor, targets: torch.Tensor,
                     history_items: torch.Tensor, history_offsets: torch.Tensor, mask_history: bool = True,
                     kmax: int = 20) -> torch.Tensor:
        """Pessimistic ranks (clipped at kmax + 1) of each query's target (docs/protocol.md, "Ranking").

        queries: [B, D]; item_rep: [N + 1, D]; targets: [B] int64 1-based; history CSR [H] / [B + 1] of
        the events before each target. rank = 1 + #{unseen items scoring >= the target} (from the top
        kmax + 1 of ``topk_scores`` with the history and the target excluded) + #{other history items
        scoring >= it} when not ``mask_history``. The target's score includes its repeat offset when it
        is in the history. Ranks past kmax are reported as kmax + 1, exact for NDCG/HR/MRR@K, K <= kmax.
        """
        B = queries.shape[0]
        dev = queries.device
        t_score = self.item_scores(queries, item_rep, targets.view(-1, 1), history_items, history_offsets)[:, 0]
        ex_off = history_offsets + torch.arange(B + 1, device=dev)          # each row: history + target
        ex_idx = torch.empty(int(ex_off[-1]), dtype=torch.int64, device=dev)
        is_target = torch.zeros_like(ex_idx, dtype=torch.bool)
        is_target[ex_off[1:] - 1] = True
        ex_idx[is_target] = targets
        ex_idx[~is_target] = history_items
        k = min(kmax + 1, item_rep.shape[0] - 1)
        vals, idx = self._catalogue_topk(queries.float(), item_rep, k, exclude_offsets=ex_off,
                                         exclude_indices=ex_idx - 1)
        ahead = ((vals >= t_score.view(-1, 1)) & (idx >= 0)).sum(1)
        if not mask_history and (history_items.numel() or isinstance(item_rep, ShardedRows)):
            r, it, hs = self.history_scores(queries, item_rep, history_items, history_offsets)
            other = it != targets[r]
            ahead = ahead.index_add(0, r[other], (hs[other] >= t_score[r[other]]).long())
        return torch.clamp(1 + ahead, max=kmax + 1)

    @torch.no_grad()
    def similar(self, unit_items: torch.Tensor, item: int, k: int):
        """The k items (1-based) nearest ``item`` by cosine: ``unit_items`` [N, D] are the catalogue's
        L2-normalised representations (rows 0..N-1 = items 1..N); the item itself is excluded.
        Returns (items list, similarities list)."""
        q = unit_items[item - 1].view(1, -1)
        vals, idx = self._topk(q, unit_items, min(k, unit_items.shape[0]),
                               exclude_offsets=torch.tensor([0, 1]), exclude_indices=torch.tensor([item - 1]))
        keep = idx[0] >= 0
        return (idx[0][keep] + 1).tolist(), vals[0][keep].tolist()

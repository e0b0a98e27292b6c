"""Token batches: what the model reads, built from a LeaveOneOutSplit.

Every user's token stream is ``[profile] + history + candidates``:

- history: past events (item, rating, time gap), each predicting the next item
  (its ``next_items`` entry, 0 = no target);
- candidates: items appended as *targets* (``num_targets`` of jagged_attention):
  each sees the history and itself only; the ranking head predicts their rating
  and like. They carry no rating (that is the label).

The profile token (when the model uses one) is added by the model from ``users``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from ..data.split import LeaveOneOutSplit


@dataclass
class TokenBatch:
    """B users' token streams (history and candidates, packed).

    users: [B] int64.
    items: [L] int64 history items; ratings: [L] float32 (NaN = unknown) or None;
    gaps: [L] int64 time-gap buckets (0 = first event of the user); offsets: [B + 1] int64.
    next_items: [L] int64 the next item after each history event (0 = none, no retrieval loss).
    first_items: [B] int64 the item a profile token predicts (the first history item; 0 = none).
    cand_items: [C] int64, cand_gaps: [C] int64, cand_offsets: [B + 1] int64 the candidates.
    cand_ratings: [C] float32 labels (NaN = unknown) or None.
    targets: [B] int64 held-out item per user (evaluation batches only, else None).
    history_items / history_offsets: CSR of each user's full history before the target (evaluation only).
    """

    users: torch.Tensor
    items: torch.Tensor
    ratings: Optional[torch.Tensor]
    gaps: torch.Tensor
    offsets: torch.Tensor
    next_items: torch.Tensor
    first_items: torch.Tensor
    cand_items: torch.Tensor
    cand_gaps: torch.Tensor
    cand_offsets: torch.Tensor
    cand_ratings: Optional[torch.Tensor]
    targets: Optional[torch.Tensor] = None
    history_items: Optional[torch.Tensor] = None
    history_offsets: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.users.numel()

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                             for f in fields(self)})


def time_buckets(gaps: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of a gap in seconds: 0 for none (gap < 0), else 1 + min(floor(log2(1 + gap)), num_buckets - 1)."""
    g = np.asarray(gaps, dtype=np.float64)
    b = 1 + np.minimum(np.floor(np.log2(1.0 + np.maximum(g, 0.0))), num_buckets - 1).astype(np.int64)
    return np.where(g < 0, 0, b)


def _offsets(lens) -> np.ndarray:
    off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lens, dtype=np.int64), out=off[1:])
    return off


def _cat(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


class TokenBuilder:
    """Builds TokenBatches from a split for a model config (max_len, candidates, time buckets)."""

    def __init__(self, split: LeaveOneOutSplit, max_len: int, num_time_buckets: int = 24,
                 num_rank_candidates: int = 4, rank_shift: int = 4):
        self.split, self.max_len = split, max_len
        self.num_rank_candidates, self.rank_shift = num_rank_candidates, rank_shift
        ts = split.timestamps
        gaps = np.full(len(ts), -1.0)
        gaps[1:] = ts[1:] - ts[:-1]
        starts = split.user_offsets[:-1]
        gaps[starts[starts < len(ts)]] = -1.0  # first event of each user
        self.gap_bucket = time_buckets(gaps, num_time_buckets)

    @classmethod
    def for_config(cls, split: LeaveOneOutSplit, cfg) -> "TokenBuilder":
        return cls(split, cfg.max_len, cfg.num_time_buckets, cfg.num_rank_candidates, cfg.rank_shift)

    def _assemble(self, users, hist, cands, device, targets=None, history=None) -> TokenBatch:
        """hist / cands: per user (start, end) positions into the split's sorted arrays."""
        sp = self.split
        hp = _cat([np.arange(a, b) for a, b in hist], np.int64)
        cp = _cat([np.arange(a, b) for a, b in cands], np.int64)
        hl = [b - a for a, b in hist]
        nxt = np.zeros(len(hp), dtype=np.int64)
        ends = np.cumsum(hl)
        # next item: the event after each history event, when that event is still a training event.
        user_of = np.repeat(np.asarray(users, dtype=np.int64), hl)
        limit = sp.user_offsets[user_of] + sp.train_len[user_of]
        has_next = hp + 1 < limit
        nxt[has_next] = sp.items[hp[has_next] + 1]
        first = np.asarray([sp.items[a] if b > a else 0 for a, b in hist], dtype=np.int64)
        r = sp.ratings
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        del ends
        return TokenBatch(
            users=t(np.asarray(users, dtype=np.int64)), items=t(sp.items[hp]),
            ratings=None if r is None else t(r[hp]), gaps=t(self.gap_bucket[hp]), offsets=t(_offsets(hl)),
            next_items=t(nxt), first_items=t(first),
            cand_items=t(sp.items[cp]), cand_gaps=t(self.gap_bucket[cp]),
            cand_offsets=t(_offsets([b - a for a, b in cands])), cand_ratings=None if r is None else t(r[cp]),
            targets=None if targets is None else t(targets),
            history_items=None if history is None else t(history[0]),
            history_offsets=None if history is None else t(history[1]),
        )

    def train_batch(self, users, rng: Optional[np.random.Generator] = None, candidates: bool = True,
                    device=None) -> TokenBatch:
        """Training streams of ``users`` (each with >= 2 training events).

        Without candidates: the last ``max_len`` training events but one, each predicting the next.
        With candidates: a cut c = m - K - s (s uniform in [0, rank_shift], from ``rng``) splits the
        m training events into history e[:c] (predicting e[1:c+1]) and K candidates e[c:c+K].
        """
        sp = self.split
        hist, cands = [], []
        for u in users:
            s0, m = int(sp.user_offsets[u]), int(sp.train_len[u])
            if candidates:
                k = min(self.num_rank_candidates, m - 1)
                shift = int(rng.integers(0, self.rank_shift + 1)) if rng is not None else 0
                c = max(1, m - k - shift)
                k = min(k, m - c)
            else:
                c, k = m - 1, 0
            hist.append((s0 + max(0, c - self.max_len), s0 + c))
            cands.append((s0 + c, s0 + c + k))
        return self._assemble(users, hist, cands, device)

    def eval_batch(self, stage: str, users, device=None) -> TokenBatch:
        """Streams ranking each user's ``stage`` ("valid"/"test") event: the history before it (last
        ``max_len`` events), the event itself as the one candidate (its rating is the label)."""
        sp = self.split
        users = np.asarray(users, dtype=np.int64)
        tpos = sp._stage_pos(stage, users)
        hist = [(int(max(sp.user_offsets[u], p - self.max_len)), int(p)) for u, p in zip(users, tpos)]
        cands = [(int(p), int(p) + 1) for p in tpos]
        return self._assemble(users, hist, cands, device, targets=sp.items[tpos], history=sp.history(stage, users))

    def user_batch(self, users, stage: str = "test", device=None) -> TokenBatch:
        """Streams for recommending after all of each user's events up to and including ``stage``'s
        ("test": every event), without candidates."""
        sp = self.split
        users = np.asarray(users, dtype=np.int64)
        end = sp.user_offsets[users + 1] if stage == "test" else sp._stage_pos("test", users)
        hist = [(int(max(sp.user_offsets[u], e - self.max_len)), int(e)) for u, e in zip(users, end)]
        return self._assemble(users, hist, [(e, e) for _, e in hist], device)

"""Token batches from live histories (any item sequence, not only a split's users).

A served user's history is its data-set events followed by the events posted to the
service, or a history given in the request. :func:`live_token_batch` turns such
histories into the :class:`~unirec.models.TokenBatch` the model reads, with the same
time-gap buckets and ``max_len`` window as :class:`~unirec.models.TokenBuilder`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.inputs import TokenBatch, time_buckets


@dataclass
class History:
    """One user's events in time order.

    items: [n] int64 1-based internal item ids; ratings: [n] float32 (NaN = unknown);
    timestamps: [n] float64 seconds (NaN = unknown); user: the internal user index (0 = unknown to the model).
    """

    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user: int = 0

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def of_items(cls, items: Sequence[int], user: int = 0) -> "History":
        """A history of items only (no ratings, no timestamps)."""
        it = np.asarray(items, dtype=np.int64)
        return cls(it, np.full(len(it), np.nan, np.float32), np.full(len(it), np.nan), user)

    def concat(self, other: "History") -> "History":
        """This history followed by ``other``'s events (the user of ``self``)."""
        return History(np.concatenate([self.items, other.items]), np.concatenate([self.ratings, other.ratings]),
                       np.concatenate([self.timestamps, other.timestamps]), self.user)


def gap_buckets(timestamps: np.ndarray, num_buckets: int) -> np.ndarray:
    """[n] time-gap buckets of one user's events, as TokenBuilder computes them: 0 for the first event
    and for an unknown gap (a NaN timestamp on either side), else ``time_buckets`` of the gap in seconds
    (a negative gap, an event posted with an earlier time than the one before it, counts as 0 s)."""
    ts = np.asarray(timestamps, dtype=np.float64)
    gaps = np.full(len(ts), -1.0)
    if len(ts) > 1:
        d = ts[1:] - ts[:-1]
        gaps[1:] = np.where(np.isnan(d), -1.0, np.maximum(d, 0.0))
    return time_buckets(gaps, num_buckets)


def live_token_batch(histories: Sequence[History], max_len: int, num_time_buckets: int,
                     device=None) -> TokenBatch:
    """The TokenBatch recommending after each history's last event.

    Each stream holds the last ``max_len`` events (gap buckets computed over the whole history, so the
    first kept event keeps its gap to the event before it) and no candidates; ``history_items`` /
    ``history_offsets`` hold every event (the items to exclude and the repeat offsets' input).
    Every history must have at least one event (an empty stream has no state to read).
    """
    if any(len(h) == 0 for h in histories):
        raise ValueError("live_token_batch: every history needs at least one event")
    keep = [slice(max(0, len(h) - max_len), len(h)) for h in histories]
    lens = np.asarray([s.stop - s.start for s in keep], dtype=np.int64)
    full = np.asarray([len(h) for h in histories], dtype=np.int64)
    off = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    hoff = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(full, out=hoff[1:])
    items = np.concatenate([h.items[s] for h, s in zip(histories, keep)]).astype(np.int64)
    ratings = np.concatenate([h.ratings[s] for h, s in zip(histories, keep)]).astype(np.float32)
    gaps = np.concatenate([gap_buckets(h.timestamps, num_time_buckets)[s] for h, s in zip(histories, keep)])
    first = np.asarray([h.items[s.start] for h, s in zip(histories, keep)], dtype=np.int64)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    zeros = torch.zeros(len(histories) + 1, dtype=torch.int64, device=device)
    return TokenBatch(
        users=t(np.asarray([h.user for h in histories], dtype=np.int64)), items=t(items), ratings=t(ratings),
        gaps=t(gaps.astype(np.int64)), offsets=t(off), next_items=t(np.zeros(len(items), dtype=np.int64)),
        first_items=t(first), cand_items=empty, cand_gaps=empty, cand_offsets=zeros, cand_ratings=None,
        history_items=t(np.concatenate([h.items for h in histories]).astype(np.int64)), history_offsets=t(hoff),
    )


def split_history(split, user: int, stage: Optional[str] = None) -> History:
    """User ``user``'s (internal index) data-set events from a LeaveOneOutSplit: all of them (``stage`` None
    or "test"), or those before the test event ("valid")."""
    s, e = int(split.user_offsets[user]), int(split.user_offsets[user + 1])
    if stage == "valid":
        e = int(split._stage_pos("test", np.asarray([user]))[0])
    r = split.ratings[s:e] if split.ratings is not None else np.full(e - s, np.nan, np.float32)
    return History(split.items[s:e].copy(), r.astype(np.float32), split.timestamps[s:e].copy(), user)

"""Leave-one-out split and jagged (packed + offsets) batches, per DESIGN.md section 7.

Each user's events are sorted by time (ties keep file order). For a user with
n >= 3 events the last is the test target, the one before the validation
target, and the first n - 2 are training events; users with fewer than 3
events only train. Validation ranks the validation item given the training
events; test ranks the test item given the training events and the validation
event.

Batches are jagged: B sequences packed end to end in one [L] tensor with
``offsets`` [B + 1] (int64, offsets[0] = 0, offsets[B] = L); sequence b is
``x[offsets[b]:offsets[b+1]]``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Optional

import numpy as np
import torch

from .dataset import Dataset

STAGES = ("valid", "test")


def _segments(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Positions of the segments [starts[b], starts[b] + lens[b]) concatenated."""
    total = int(lens.sum())
    first = np.cumsum(lens) - lens
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lens)


def _offsets(lens: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    return off


def _t(x: Optional[np.ndarray], device) -> Optional[torch.Tensor]:
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(device)


class _ToDevice:
    def to(self, device):
        """The same batch with every tensor moved to ``device``."""
        kw = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
              for f in fields(self)}
        return type(self)(**kw)


@dataclass
class TrainBatch(_ToDevice):
    """Next-item training on B users' training prefixes.

    For user b with training events e_0..e_{m-1} (the last ``max_len + 1`` kept),
    input position j holds e_j and predicts target e_{j+1}, for j < m - 1.

    users: [B] int64 user ids.
    items, timestamps, ratings: [L] inputs (int64, float64, float32 or None).
    offsets: [B + 1] int64.
    targets, target_timestamps, target_ratings: [L] the next event at each position.
    """

    users: torch.Tensor
    items: torch.Tensor
    timestamps: torch.Tensor
    ratings: Optional[torch.Tensor]
    offsets: torch.Tensor
    targets: torch.Tensor
    target_timestamps: torch.Tensor
    target_ratings: Optional[torch.Tensor]


@dataclass
class EvalBatch(_ToDevice):
    """Ranking one held-out event per user given the events before it.

    users: [B] int64.
    items, timestamps, ratings: [L] the history inputs (the last ``max_len`` events before the target).
    offsets: [B + 1] int64.
    targets, target_timestamps, target_ratings: [B] the held-out event.
    history_items: [H] int64, every item the user had before the target (untruncated),
        for masking; history_offsets: [B + 1] int64. The target may occur in it (a repeat);
        masking never removes the target.
    """

    users: torch.Tensor
    items: torch.Tensor
    timestamps: torch.Tensor
    ratings: Optional[torch.Tensor]
    offsets: torch.Tensor
    targets: torch.Tensor
    target_timestamps: torch.Tensor
    target_ratings: Optional[torch.Tensor]
    history_items: torch.Tensor
    history_offsets: torch.Tensor


class LeaveOneOutSplit:
    """A Dataset split leave-one-out (see the module docstring).

    Attributes:
        dataset: the Dataset.
        items, timestamps, ratings: [n] events sorted by (user, time, file order).
        user_offsets: [num_users + 2] int64; user u's events are [user_offsets[u], user_offsets[u+1]).
        train_len: [num_users + 1] int64 training events per user.
        eval_users: [E] int64 users with a validation and a test event, ascending.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        ds = dataset
        order = np.lexsort((np.arange(ds.num_interactions), ds.timestamp, ds.user))
        self.users_sorted = ds.user[order]
        self.items = ds.item[order].astype(np.int64)
        self.timestamps = ds.timestamp[order].astype(np.float64)
        self.ratings = None if ds.rating is None else ds.rating[order].astype(np.float32)
        counts = np.bincount(ds.user, minlength=ds.num_users + 1).astype(np.int64)
        self.user_offsets = _offsets(counts)
        self.train_len = np.where(counts >= 3, counts - 2, counts)
        self.eval_users = np.nonzero(counts >= 3)[0].astype(np.int64)

    # ----------------------------------------------------------------- views

    def _stage_pos(self, stage: str, users: np.ndarray) -> np.ndarray:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.user_offsets[users] + self.train_len[users] + (1 if stage == "test" else 0)

    def train_positions(self) -> np.ndarray:
        """[N_train] positions (into the sorted arrays) of all training events."""
        users = np.arange(len(self.train_len))
        return _segments(self.user_offsets[users], self.train_len)

    def train_interactions(self):
        """(users, items, timestamps, ratings) of the training events, each [N_train]."""
        p = self.train_positions()
        return self.users_sorted[p], self.items[p], self.timestamps[p], None if self.ratings is None else self.ratings[p]

    def item_popularity(self) -> np.ndarray:
        """[num_items + 1] int64 training events per item (the popularity baseline's scores)."""
        return np.bincount(self.items[self.train_positions()], minlength=self.dataset.num_items + 1)

    def targets(self, stage: str) -> np.ndarray:
        """[E] held-out items of ``eval_users`` at ``stage``."""
        return self.items[self._stage_pos(stage, self.eval_users)]

    def history(self, stage: str, users: Optional[np.ndarray] = None):
        """CSR (items [H], offsets [B + 1]) of every event before the ``stage`` target of each user."""
        users = self.eval_users if users is None else np.asarray(users)
        lens = self._stage_pos(stage, users) - self.user_offsets[users]
        return self.items[_segments(self.user_offsets[users], lens)], _offsets(lens)

    # ----------------------------------------------------------------- batches

    def train_batch(self, users: np.ndarray, max_len: Optional[int] = None, device=None) -> TrainBatch:
        """The TrainBatch of ``users`` (those with < 2 training events give empty sequences)."""
        users = np.asarray(users, dtype=np.int64)
        m = self.train_len[users]
        keep = np.maximum(m - 1, 0) if max_len is None else np.minimum(np.maximum(m - 1, 0), max_len)
        start = self.user_offsets[users] + m - 1 - keep  # first input position
        pin = _segments(start, keep)
        ptg = pin + 1
        r = self.ratings
        return TrainBatch(
            users=_t(users, device), items=_t(self.items[pin], device), timestamps=_t(self.timestamps[pin], device),
            ratings=None if r is None else _t(r[pin], device), offsets=_t(_offsets(keep), device),
            targets=_t(self.items[ptg], device), target_timestamps=_t(self.timestamps[ptg], device),
            target_ratings=None if r is None else _t(r[ptg], device),
        )

    def train_batches(self, batch_size: int, max_len: Optional[int] = None, shuffle: bool = True,
                      seed: int = 0, device=None) -> Iterator[TrainBatch]:
        """Batches of ``batch_size`` users over all users with >= 2 training events (shuffled by ``seed``)."""
        users = np.nonzero(self.train_len >= 2)[0]
        if shuffle:
            users = np.random.default_rng(seed).permutation(users)
        for i in range(0, len(users), batch_size):
            yield self.train_batch(users[i:i + batch_size], max_len, device)

    def eval_batch(self, stage: str, users: np.ndarray, max_len: Optional[int] = None, device=None) -> EvalBatch:
        """The EvalBatch of ``users`` (each must be in eval_users) at ``stage``."""
        users = np.asarray(users, dtype=np.int64)
        tpos = self._stage_pos(stage, users)
        hlen = tpos - self.user_offsets[users]
        keep = hlen if max_len is None else np.minimum(hlen, max_len)
        pin = _segments(tpos - keep, keep)
        hist = self.items[_segments(self.user_offsets[users], hlen)]
        r = self.ratings
        return EvalBatch(
            users=_t(users, device), items=_t(self.items[pin], device), timestamps=_t(self.timestamps[pin], device),
            ratings=None if r is None else _t(r[pin], device), offsets=_t(_offsets(keep), device),
            targets=_t(self.items[tpos], device), target_timestamps=_t(self.timestamps[tpos], device),
            target_ratings=None if r is None else _t(r[tpos], device),
            history_items=_t(hist, device), history_offsets=_t(_offsets(hlen), device),
        )

    def eval_batches(self, stage: str, batch_size: int, max_len: Optional[int] = None,
                     device=None) -> Iterator[EvalBatch]:
        """Batches of ``batch_size`` users over ``eval_users`` in ascending order."""
        for i in range(0, len(self.eval_users), batch_size):
            yield self.eval_batch(stage, self.eval_users[i:i + batch_size], max_len, device)

    def __repr__(self) -> str:
        return (f"LeaveOneOutSplit({self.dataset.name}: {int(self.train_len.sum())} train events, "
                f"{len(self.eval_users)} validation / test users)")


def leave_one_out(dataset: Dataset) -> LeaveOneOutSplit:
    """Splits ``dataset`` leave-one-out by time (DESIGN.md section 7)."""
    return LeaveOneOutSplit(dataset)

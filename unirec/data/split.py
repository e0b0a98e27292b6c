"""Leave-one-out split (docs/protocol.md, "Splits").

Each user's events are sorted by time (ties keep file order). For a user with
n >= 3 events the last is the test target, the one before the validation
target, and the first n - 2 are training events; users with fewer than 3
events only train. Validation ranks the validation item given the training
events; test ranks the test item given the training events and the validation
event.

The batches the model reads are built from a split by :mod:`unirec.data.batch`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

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

    def stage_positions(self, stage: str, users: np.ndarray) -> np.ndarray:
        """[B] positions (into the sorted arrays) of each user's ``stage`` ("valid" / "test") event."""
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
        return self.items[self.stage_positions(stage, self.eval_users)]

    def history(self, stage: str, users: Optional[np.ndarray] = None):
        """CSR (items [H], offsets [B + 1]) of every event before the ``stage`` target of each user."""
        users = self.eval_users if users is None else np.asarray(users)
        lens = self.stage_positions(stage, users) - self.user_offsets[users]
        return self.items[_segments(self.user_offsets[users], lens)], _offsets(lens)

    def __repr__(self) -> str:
        return (f"LeaveOneOutSplit({self.dataset.name}: {int(self.train_len.sum())} train events, "
                f"{len(self.eval_users)} validation / test users)")


def leave_one_out(dataset: Dataset) -> LeaveOneOutSplit:
    """Splits ``dataset`` leave-one-out by time (docs/protocol.md)."""
    return LeaveOneOutSplit(dataset)

"""Splits (docs/protocol.md, "Splits" and "Cold items").

Leave-one-out (:class:`LeaveOneOutSplit`): each user's events are sorted by time (ties keep file
order). For a user with n >= 3 events the last is the test target, the one before the validation
target, and the first n - 2 are training events; users with fewer than 3 events only train.
Validation ranks the validation item given the training events; test ranks the test item given the
training events and the validation event.

Target domain (docs/protocol.md, "Genre domains (cross-domain)"): when the data set has
``target_items`` (:func:`unirec.data.domains.domain_dataset`), each user's events after the user's last
event on a target item are left out (they are the future of the test case); a user with m >= 3 target
events is validated on the second-last and tested on the last of them, and trains on every event (target
or not) before the validation event; users with fewer than 3 target events only train. Histories keep
events of both domains.

Cold items (:class:`ColdItemSplit`): the ``share`` of items first rated latest are cold; every event
on a cold item leaves training, and each event on a cold item (after at least one earlier event of
its user) is an evaluation case, ranked given all of the user's earlier events.

The batches the model reads are built from a split by :mod:`unirec.data.batch`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .dataset import Dataset

STAGES = ("valid", "test")
COLD_STAGES = ("cold_valid", "cold_test")
SPLITS = ("leave-one-out", "cold-items")


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

    ``keep``: an optional [num_interactions] bool mask of the data set's events the split holds (the
    others are left out entirely, as if absent from the data); ``hold_out=False``: every event is a
    training event (no validation or test event, no ``eval_users``), e.g. the training part of a
    :class:`ColdItemSplit`. A data set with ``target_items`` is split by its target events (module
    docstring).

    Attributes:
        dataset: the Dataset.
        items, timestamps, ratings: [n] events sorted by (user, time, file order).
        event_rows: [n] int64 the data set's row of each sorted event.
        user_offsets: [num_users + 2] int64; user u's events are [user_offsets[u], user_offsets[u+1]).
        train_len: [num_users + 1] int64 training events per user.
        eval_users: [E] int64 users with a validation and a test event, ascending.
        target_items: the data set's [num_items + 1] bool target items, or None (every item a target).
        is_target: [n] bool whether each sorted event is on a target item (all True without target_items).
    """

    def __init__(self, dataset: Dataset, keep: Optional[np.ndarray] = None, hold_out: bool = True):
        self.dataset = dataset
        ds = dataset
        if keep is None:
            order = np.lexsort((np.arange(ds.num_interactions), ds.timestamp, ds.user))
        else:
            keep = np.asarray(keep)
            if keep.dtype != np.bool_ or keep.shape != (ds.num_interactions,):
                raise ValueError(f"keep must be a bool mask of the {ds.num_interactions} events, "
                                 f"got {keep.dtype} {keep.shape}")
            rows = np.flatnonzero(keep)
            order = rows[np.lexsort((rows, ds.timestamp[rows], ds.user[rows]))]
        self.target_items = ds.target_items
        if self.target_items is not None:
            target = np.asarray(self.target_items)
            if target.dtype != np.bool_ or target.shape != (ds.num_items + 1,):
                raise ValueError(f"dataset.target_items must be a bool mask of shape ({ds.num_items + 1},), got "
                                 f"{target.dtype} {target.shape}")
            # drop each user's events after the user's last target event
            is_t = target[ds.item[order]]
            last = np.full(ds.num_users + 1, -1, dtype=np.int64)
            np.maximum.at(last, ds.user[order][is_t], np.flatnonzero(is_t))
            order = order[np.arange(len(order)) <= last[ds.user[order]]]
        self.event_rows = order.astype(np.int64)
        self.hold_out = bool(hold_out)
        self.users_sorted = ds.user[order]
        self.items = ds.item[order].astype(np.int64)
        self.timestamps = ds.timestamp[order].astype(np.float64)
        self.ratings = None if ds.rating is None else ds.rating[order].astype(np.float32)
        self.is_target = np.ones(len(order), dtype=bool) if self.target_items is None else target[self.items]
        counts = np.bincount(ds.user[order], minlength=ds.num_users + 1).astype(np.int64)
        self.user_offsets = _offsets(counts)
        if not hold_out:
            self.train_len = counts
            self.eval_users = np.zeros(0, dtype=np.int64)
        elif self.target_items is None:
            self.train_len = np.where(counts >= 3, counts - 2, counts)
            self.eval_users = np.nonzero(counts >= 3)[0].astype(np.int64)
        else:
            t_pos = np.flatnonzero(self.is_target)                       # target events, grouped by user
            t_count = np.bincount(self.users_sorted[t_pos], minlength=ds.num_users + 1).astype(np.int64)
            t_end = np.cumsum(t_count)              # user u's target events: t_pos[t_end[u] - t_count[u]:t_end[u]]
            self.eval_users = np.nonzero(t_count >= 3)[0].astype(np.int64)
            self.train_len = counts.copy()
            valid_pos = t_pos[t_end[self.eval_users] - 2]                # the second-last target event
            self.train_len[self.eval_users] = valid_pos - self.user_offsets[self.eval_users]
        # each user's validation / test event, relative to the user's first event (eval_users only)
        self._stage_offset = {"valid": self.train_len.copy(), "test": self.train_len + 1}
        if hold_out and self.target_items is not None:
            self._stage_offset["test"][self.eval_users] = counts[self.eval_users] - 1  # the last event: a target

    # ----------------------------------------------------------------- views

    def stage_positions(self, stage: str, users: np.ndarray) -> np.ndarray:
        """[B] positions (into the sorted arrays) of each user's ``stage`` ("valid" / "test") event."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not self.hold_out:
            raise ValueError("this split holds out no validation or test events (hold_out=False)")
        return self.user_offsets[users] + self._stage_offset[stage][users]

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
        if not self.hold_out:
            return (f"LeaveOneOutSplit({self.dataset.name}: {int(self.train_len.sum())} train events, "
                    "no held-out events)")
        domain = "" if self.target_items is None else f", ranked among {int(self.target_items.sum())} target items"
        return (f"LeaveOneOutSplit({self.dataset.name}: {int(self.train_len.sum())} train events, "
                f"{len(self.eval_users)} validation / test users{domain})")


def leave_one_out(dataset: Dataset) -> LeaveOneOutSplit:
    """Splits ``dataset`` leave-one-out by time (docs/protocol.md)."""
    return LeaveOneOutSplit(dataset)


def _num_cold(share: float, num_rated: int) -> int:
    """ceil(share * num_rated), robust to the float error of share * n (0.15 * 100 = 15.000000000000002)."""
    return int(np.ceil(round(share * num_rated, 9)))


class ColdItemSplit:
    """A cold-item split (docs/protocol.md, "Cold items").

    Items are ordered by the time of their first event (ties: by item index); the last
    ceil(``share`` x the rated items) are **cold**. Every event on a cold item leaves training: cold
    items are neither training inputs nor targets (and the training softmax leaves them out, see
    :meth:`warm_items`). The cold items are drawn into **validation** (round(C / 3) of them) and
    **test** (the rest) with ``np.random.default_rng(seed)``, a seed of its own (not the training
    seed), so every arm and seed is evaluated on the same cases.

    A case of stage "cold_valid" / "cold_test" is an event on a validation / test cold item that has
    at least one earlier event of its user: its target is the event's item, its history every earlier
    event of the user (warm and cold, in time order). A cold event that is its user's first has no
    history to rank from and is not a case (counted in :meth:`summary` as ``num_no_history``).

    Attributes:
        dataset, share, seed: as given.
        full: LeaveOneOutSplit over every event (the evaluation histories; case positions index it).
        train: LeaveOneOutSplit over the warm events only, all of them training (``hold_out=False``).
        cold_items, valid_items, test_items: sorted int64 item ids (1-based).
        is_cold: [num_items + 1] bool.
        first_time: [num_items + 1] float64 each item's first event time (inf: never rated).
    """

    def __init__(self, dataset: Dataset, share: float = 0.15, seed: int = 0):
        share = float(share)
        if not 0.0 < share < 1.0:
            raise ValueError(f"cold share must lie in (0, 1), got {share}")
        if dataset.target_items is not None:
            raise ValueError(f"the cold-item split does not take a target-domain data set ({dataset.name!r} has "
                             "target_items); use the leave-one-out split")
        if int(seed) != seed:
            raise ValueError(f"cold seed must be an integer, got {seed!r}")
        self.dataset, self.share, self.seed = dataset, share, int(seed)
        ds = dataset
        first = np.full(ds.num_items + 1, np.inf)
        np.minimum.at(first, ds.item, ds.timestamp.astype(np.float64))
        self.first_time = first
        rated = np.flatnonzero(np.isfinite(first[1:])).astype(np.int64) + 1
        n_cold = _num_cold(share, len(rated))
        if n_cold < 2 or n_cold >= len(rated):
            raise ValueError(f"cold share {share} of {len(rated)} rated items gives {n_cold} cold items; the "
                             "cold-item split needs at least 2 cold items (validation and test) and one warm item")
        by_time = rated[np.lexsort((rated, first[rated]))]
        self.cold_items = np.sort(by_time[-n_cold:])
        drawn = np.random.default_rng(self.seed).permutation(self.cold_items)
        n_valid = min(max(1, int(np.floor(n_cold / 3 + 0.5))), n_cold - 1)
        self.valid_items, self.test_items = np.sort(drawn[:n_valid]), np.sort(drawn[n_valid:])
        self.is_cold = np.zeros(ds.num_items + 1, dtype=bool)
        self.is_cold[self.cold_items] = True

        self.full = LeaveOneOutSplit(ds)
        self.train = LeaveOneOutSplit(ds, keep=~self.is_cold[ds.item], hold_out=False)
        fs = self.full
        n = len(fs.items)
        has_history = np.arange(n) > fs.user_offsets[fs.users_sorted]
        self._positions, self._no_history = {}, {}
        for stage, items in zip(COLD_STAGES, (self.valid_items, self.test_items)):
            on = np.zeros(ds.num_items + 1, dtype=bool)
            on[items] = True
            hit = on[fs.items]
            self._positions[stage] = np.flatnonzero(hit & has_history).astype(np.int64)
            self._no_history[stage] = int((hit & ~has_history).sum())

    # ----------------------------------------------------------------- cases

    def _check(self, stage: str) -> None:
        if stage not in COLD_STAGES:
            raise ValueError(f"stage must be one of {COLD_STAGES}, got {stage!r}")

    def cases(self, stage: str):
        """(users [n], positions [n]) int64 of the ``stage`` cases, in (user, time) order; positions
        index ``full``'s sorted events (the target is ``full.items[positions]``, the history the
        user's events before it)."""
        self._check(stage)
        pos = self._positions[stage]
        return self.full.users_sorted[pos].astype(np.int64), pos.copy()

    def targets(self, stage: str) -> np.ndarray:
        """[n] the cold item of each ``stage`` case."""
        self._check(stage)
        return self.full.items[self._positions[stage]]

    def history(self, stage: str):
        """CSR (items [H], offsets [n + 1]) of each ``stage`` case's history: every earlier event of its user."""
        users, pos = self.cases(stage)
        start = self.full.user_offsets[users]
        lens = pos - start
        return self.full.items[_segments(start, lens)], _offsets(lens)

    def case_ids(self, stage: str) -> np.ndarray:
        """[n] str stable ids of the ``stage`` cases, "<user id>@<item id>@<k>" with the data set's ids and
        k = how many earlier events the user has on the same item (0 for the first); the same event has
        the same id in every run on the same data, whatever the model or the training seed."""
        users, pos = self.cases(stage)
        fs = self.full
        items = fs.items[pos]
        # k of every event on the stage's items (cases and the first events without history alike)
        on = np.zeros(self.dataset.num_items + 1, dtype=bool)
        on[items] = True
        all_pos = np.flatnonzero(on[fs.items])
        key = fs.users_sorted[all_pos].astype(np.int64) * (self.dataset.num_items + 1) + fs.items[all_pos]
        order = np.argsort(key, kind="stable")  # within a (user, item) pair: time order
        ks = key[order]
        start = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]]) if len(ks) else np.zeros(0, dtype=np.int64)
        k_all = np.empty(len(ks), dtype=np.int64)
        k_all[order] = np.arange(len(ks)) - np.repeat(start, np.diff(np.r_[start, len(ks)]))
        k = k_all[np.searchsorted(all_pos, pos)]
        uv, iv = self.dataset.user_vocab, self.dataset.item_vocab
        return np.asarray([f"{u}@{i}@{j}" for u, i, j in zip(uv[users], iv[items], k)], dtype=str)

    # ----------------------------------------------------------------- training

    def warm_items(self) -> np.ndarray:
        """[W] sorted int64 ids (1-based) of the items the training softmax keeps: every item but the cold ones."""
        return np.flatnonzero(~self.is_cold[1:]).astype(np.int64) + 1

    def summary(self) -> dict:
        """Sizes of the split, as metrics.json records them."""
        cold_events = int(self.is_cold[self.dataset.item].sum())
        return {"share": self.share, "seed": self.seed, "num_items": int(self.dataset.num_items),
                "num_rated_items": int(np.isfinite(self.first_time[1:]).sum()),
                "num_cold_items": int(len(self.cold_items)), "num_valid_items": int(len(self.valid_items)),
                "num_test_items": int(len(self.test_items)),
                "cold_from": float(self.first_time[self.cold_items].min()),
                "num_events": int(self.dataset.num_interactions), "num_cold_events": cold_events,
                "num_train_events": int(self.train.train_len.sum()),
                "num_cases": {s: int(len(self._positions[s])) for s in COLD_STAGES},
                "num_no_history": dict(self._no_history)}

    def __repr__(self) -> str:
        n = {s: len(self._positions[s]) for s in COLD_STAGES}
        return (f"ColdItemSplit({self.dataset.name}: {len(self.cold_items)} cold items ({len(self.valid_items)} "
                f"validation, {len(self.test_items)} test), {int(self.train.train_len.sum())} train events, "
                f"{n['cold_valid']} / {n['cold_test']} validation / test cases)")


def cold_item_split(dataset: Dataset, share: float = 0.15, seed: int = 0) -> ColdItemSplit:
    """Splits ``dataset`` by cold items (docs/protocol.md, "Cold items"); see :class:`ColdItemSplit`."""
    return ColdItemSplit(dataset, share, seed)

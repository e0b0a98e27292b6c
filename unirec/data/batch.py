"""The one token-batch pipeline: what the model reads, for training, evaluation and serving.

Every user's token stream is ``[profile] + history + candidates``:

- history: past events (item, rating, time gap), each predicting the next item
  (its ``next_items`` entry, 0 = no target);
- candidates: items appended as *targets* (``num_targets`` of jagged_attention):
  each sees the history and itself only; the ranking objective predicts their
  rating and like. They carry no rating (that is the label).

The profile token (when the model uses one) is added by the model from ``users``.

:class:`TokenBuilder` cuts streams out of a :class:`~unirec.data.LeaveOneOutSplit` (evaluation streams
at any (user, position) pairs with :meth:`TokenBuilder.case_batch`);
:func:`live_token_batch` packs any histories (a served user's data-set events followed
by the events posted to the service) with the same code: both go through :func:`pack_streams`
and the same time-gap buckets (:func:`event_gaps`, :func:`time_buckets`).
:class:`TrainBatches` is the trainer's batch source.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .split import LeaveOneOutSplit


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
    history_items / history_offsets: CSR of each user's full history before the target (evaluation
    and serving; the items to exclude from a ranking and the repeat offsets' input).
    seed: the training batch's random key (from the run's seed, the epoch and the step, the same in
    every process), which augmented views combine with each user; None outside training.
    next_ratings: [L] float32 the rating of each ``next_items`` event, first_ratings: [B] of each
    ``first_items`` event (NaN = unknown or no target), or None: what tells negative feedback targets
    from positive ones (``ModelConfig.negative_max_rating``).
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
    seed: Optional[int] = None
    next_ratings: Optional[torch.Tensor] = None
    first_ratings: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.users.numel()

    @property
    def num_tokens(self) -> int:
        """History and candidate tokens (the profile tokens not counted)."""
        return self.items.numel() + self.cand_items.numel()

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                             for f in fields(self)})


# --------------------------------------------------------------------------- time gaps


def time_buckets(gaps: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of a gap in seconds: 0 for none (gap < 0), else 1 + min(floor(log2(1 + gap)), num_buckets - 1)."""
    g = np.asarray(gaps, dtype=np.float64)
    b = 1 + np.minimum(np.floor(np.log2(1.0 + np.maximum(g, 0.0))), num_buckets - 1).astype(np.int64)
    return np.where(g < 0, 0, b)


def event_gaps(timestamps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[n] seconds since the previous event of the same user; -1 (no gap) for each user's first event
    (``starts``: positions where a user's events begin) and next to an unknown (NaN) timestamp. A
    negative gap (an event posted with an earlier time than the one before it) counts as 0 s."""
    ts = np.asarray(timestamps, dtype=np.float64)
    gaps = np.full(len(ts), -1.0)
    if len(ts) > 1:
        d = ts[1:] - ts[:-1]
        gaps[1:] = np.where(np.isnan(d), -1.0, np.maximum(d, 0.0))
    starts = np.asarray(starts, dtype=np.int64)
    gaps[starts[starts < len(ts)]] = -1.0
    return gaps


# --------------------------------------------------------------------------- packing


def _offsets(lens) -> np.ndarray:
    off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lens, dtype=np.int64), out=off[1:])
    return off


def _ranges(spans) -> np.ndarray:
    """The positions of the (start, end) ranges concatenated."""
    parts = [np.arange(a, b) for a, b in spans]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def pack_streams(users, items: np.ndarray, ratings: Optional[np.ndarray], gap_bucket: np.ndarray, hist, cands,
                 next_limit: np.ndarray, device=None, targets=None, history=None) -> TokenBatch:
    """The TokenBatch of B streams cut out of flat event arrays.

    items / ratings / gap_bucket: [n] events; hist / cands: per stream (start, end) positions of the history
    and the candidates; next_limit: [B] the position past which a history event has no next-item target
    (the end of the user's training events); targets: [B] or None; history: CSR (items, offsets) or None.
    """
    hp, cp = _ranges(hist), _ranges(cands)
    hl = [b - a for a, b in hist]
    nxt = np.zeros(len(hp), dtype=np.int64)
    has_next = hp + 1 < np.repeat(np.asarray(next_limit, dtype=np.int64), hl)
    nxt[has_next] = items[hp[has_next] + 1]
    first = np.asarray([items[a] if b > a else 0 for a, b in hist], dtype=np.int64)
    nxt_r = first_r = None
    if ratings is not None:
        nxt_r = np.full(len(hp), np.nan, dtype=np.float32)
        nxt_r[has_next] = ratings[hp[has_next] + 1]
        first_r = np.asarray([ratings[a] if b > a else np.nan for a, b in hist], dtype=np.float32)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    return TokenBatch(
        users=t(np.asarray(users, dtype=np.int64)), items=t(items[hp].astype(np.int64)),
        ratings=None if ratings is None else t(ratings[hp]), gaps=t(gap_bucket[hp]), offsets=t(_offsets(hl)),
        next_items=t(nxt), first_items=t(first),
        cand_items=t(items[cp].astype(np.int64)), cand_gaps=t(gap_bucket[cp]),
        cand_offsets=t(_offsets([b - a for a, b in cands])), cand_ratings=None if ratings is None else t(ratings[cp]),
        targets=None if targets is None else t(targets),
        history_items=None if history is None else t(history[0]),
        history_offsets=None if history is None else t(history[1]),
        next_ratings=None if nxt_r is None else t(nxt_r), first_ratings=None if first_r is None else t(first_r),
    )


class TokenBuilder:
    """Builds TokenBatches from a split for a model config (max_len, candidates, time buckets)."""

    def __init__(self, split: LeaveOneOutSplit, max_len: int, num_time_buckets: int = 24,
                 num_rank_candidates: int = 4, rank_shift: int = 4):
        self.split, self.max_len = split, max_len
        self.num_rank_candidates, self.rank_shift = num_rank_candidates, rank_shift
        self.gap_bucket = time_buckets(event_gaps(split.timestamps, split.user_offsets[:-1]), num_time_buckets)

    @classmethod
    def for_config(cls, split: LeaveOneOutSplit, cfg) -> "TokenBuilder":
        """From any config with max_len, num_time_buckets, num_rank_candidates and rank_shift."""
        return cls(split, cfg.max_len, cfg.num_time_buckets, cfg.num_rank_candidates, cfg.rank_shift)

    def _pack(self, users, hist, cands, device, targets=None, history=None) -> TokenBatch:
        sp = self.split
        users = np.asarray(users, dtype=np.int64)
        limit = sp.user_offsets[users] + sp.train_len[users]
        batch = pack_streams(users, sp.items, sp.ratings, self.gap_bucket, hist, cands, limit, device, targets,
                             history)
        return batch if getattr(sp, "target_items", None) is None else self.target_only(batch)

    def target_only(self, batch: TokenBatch) -> TokenBatch:
        """A split with ``target_items`` (a cross-domain data set): a next item or profile target that is not
        a target item becomes 0 (no retrieval loss, as padding) and a candidate on such an item loses its
        rating label (NaN: no ranking loss). The tokens themselves stay (context)."""
        is_t = torch.from_numpy(np.asarray(self.split.target_items, dtype=bool)).to(batch.next_items.device)
        batch.next_items = torch.where(is_t[batch.next_items], batch.next_items, 0)
        batch.first_items = torch.where(is_t[batch.first_items], batch.first_items, 0)
        if batch.cand_ratings is not None:
            batch.cand_ratings = torch.where(is_t[batch.cand_items], batch.cand_ratings, float("nan"))
        return batch

    def train_batch(self, users, rng: Optional[np.random.Generator] = None, candidates: bool = True,
                    device=None, windows=None, shifts=None) -> TokenBatch:
        """Training streams of ``users`` (each with >= 2 training events).

        Window 0 (the default) of a user with m training events: without candidates, the last
        ``max_len`` training events but one, each predicting the next. With candidates: a cut
        c = m - K - s splits them into history e[:c] (predicting e[1:c+1]) and K candidates e[c:c+K];
        s in [0, rank_shift] is ``shifts[b]``, else drawn from ``rng``, else 0.
        Window j >= 1 (``windows[b]``; see :meth:`TrainBatches.num_windows`): the ``max_len`` events
        ending at m - 1 - j * max_len, each predicting the next, no candidates.
        """
        sp = self.split
        hist, cands = [], []
        for b, u in enumerate(users):
            s0, m = int(sp.user_offsets[u]), int(sp.train_len[u])
            j = 0 if windows is None else int(windows[b])
            if j > 0:
                c, k = m - 1 - j * self.max_len, 0
            elif candidates:
                k = min(self.num_rank_candidates, m - 1)
                if shifts is not None:
                    shift = int(shifts[b])
                else:
                    shift = int(rng.integers(0, self.rank_shift + 1)) if rng is not None else 0
                c = max(1, m - k - shift)
                k = min(k, m - c)
            else:
                c, k = m - 1, 0
            hist.append((s0 + max(0, c - self.max_len), s0 + c))
            cands.append((s0 + c, s0 + c + k))
        return self._pack(users, hist, cands, device)

    def eval_batch(self, stage: str, users, device=None) -> TokenBatch:
        """Streams ranking each user's ``stage`` ("valid"/"test") event: :meth:`case_batch` at the
        positions of those events."""
        users = np.asarray(users, dtype=np.int64)
        return self.case_batch(users, self.split.stage_positions(stage, users), device)

    def case_batch(self, users, positions, device=None) -> TokenBatch:
        """Streams ranking the event at each (user, position) pair (``positions`` index the split's sorted
        events; each must be one of its user's): the history is the user's events before it (the last
        ``max_len`` as tokens, all of them in ``history_items`` / ``history_offsets``), the event itself
        the one candidate (its rating is the label) and ``targets`` its item. The one path of every
        evaluation protocol (leave-one-out stages, cold-item cases)."""
        sp = self.split
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if users.shape != pos.shape:
            raise ValueError(f"case_batch: users {users.shape} and positions {pos.shape} must have the same length")
        start = sp.user_offsets[users]
        bad = (pos < start) | (pos >= sp.user_offsets[users + 1])
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(f"case_batch: position {int(pos[b])} is not an event of user {int(users[b])}")
        lens = pos - start
        hist = list(zip(np.maximum(start, pos - self.max_len).tolist(), pos.tolist()))
        cands = list(zip(pos.tolist(), (pos + 1).tolist()))
        first = np.cumsum(lens) - lens
        past = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(start - first, lens)
        return self._pack(users, hist, cands, device, targets=sp.items[pos], history=(sp.items[past], _offsets(lens)))

    def user_batch(self, users, stage: str = "test", device=None) -> TokenBatch:
        """Streams for recommending after all of each user's events up to and including ``stage``'s
        ("test": every event), without candidates."""
        sp = self.split
        users = np.asarray(users, dtype=np.int64)
        end = sp.user_offsets[users + 1] if stage == "test" else sp.stage_positions("test", users)
        hist = [(int(max(sp.user_offsets[u], e - self.max_len)), int(e)) for u, e in zip(users, end)]
        return self._pack(users, hist, [(e, e) for _, e in hist], device)


def training_users(train_len: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """The sorted ids of ``share`` (rounded up) of the users with at least two training events
    (``train_len`` [num_users + 1]), drawn with ``np.random.default_rng(seed)``: the same users for every
    model and training seed, so that runs on a share of the data pair user by user."""
    users = np.nonzero(np.asarray(train_len) >= 2)[0]
    k = int(np.ceil(share * len(users)))
    return np.sort(np.random.default_rng(seed).permutation(users)[:k])


class TrainBatches:
    """The trainer's batch source: each epoch, every training window once, in batches.

    A window is a (user, j) pair of a user with >= 2 training events (:meth:`TokenBuilder.train_batch`):
    ``windows="last"`` trains on each user's last window only; ``"all"`` also on every earlier
    ``max_len``-event window of longer histories (j = 1, 2, ...), so that no training event of a long
    history is left out; ``"random"`` on one window per user each epoch, drawn uniformly from all of
    its windows (keyed by (seed, epoch, user)): every event of a long history trains over the epochs,
    at the cost per epoch of ``"last"``.

    Epoch e orders the windows with ``np.random.default_rng([seed, e])``; the candidate cut of user u
    in epoch e is keyed by (seed, e, u), not drawn in batch order, so an epoch is the same whenever it
    runs (a resumed run repeats it) and however its batches are split across processes:
    ``epoch(e, rank=r, world=n)`` yields, of each global batch of ``batch_size`` windows, the windows
    r, r + n, r + 2n, ... (so n processes see the same global batches as one).

    ``users``: only these users' windows train (e.g. :func:`training_users`); None: every user's.

    ``augment`` (operator -> rate, :mod:`unirec.data.augment`): data augmentation, each batch followed
    by an augmented copy of every stream (:meth:`with_augmented_copies`), or of a share
    ``augment_share`` of the streams, drawn per (batch key, user); substitute and insert use item
    correlations counted over the training events only.
    """

    WINDOWS = ("last", "all", "random")

    def __init__(self, builder: TokenBuilder, batch_size: int, candidates: bool, seed: int = 0,
                 windows: str = "last", augment: Optional[Dict[str, float]] = None,
                 users: Optional[np.ndarray] = None, augment_share: float = 1.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < augment_share <= 1.0:
            raise ValueError(f"augment_share must lie in (0, 1], got {augment_share}")
        self.augment_share = float(augment_share)
        if windows not in self.WINDOWS:
            raise ValueError(f"windows must be one of {self.WINDOWS}, got {windows!r}")
        self.augment, self.similar = dict(augment or {}), None
        if self.augment:
            from .augment import OPERATORS, item_correlation
            bad = [k for k, v in self.augment.items() if k not in OPERATORS or not 0.0 <= float(v) <= 1.0]
            if bad:
                raise ValueError(f"augment: {bad[0]!r} must be one of {OPERATORS} with a rate in [0, 1]")
            if {"substitute", "insert"} & set(self.augment):  # correlations of training events only
                sp = builder.split
                train = np.concatenate([np.arange(s, s + n) for s, n in zip(sp.user_offsets[:-1], sp.train_len)])
                off = np.concatenate([[0], np.cumsum(sp.train_len)]).astype(np.int64)
                self.similar = item_correlation(torch.from_numpy(sp.items[train].astype(np.int64)),
                                                torch.from_numpy(off), int(sp.items.max(initial=0)))
        self.builder, self.batch_size, self.candidates, self.seed = builder, batch_size, candidates, seed
        self.users = np.nonzero(builder.split.train_len >= 2)[0]
        if users is not None:  # a subset of the users trains (training_users)
            self.users = np.intersect1d(self.users, np.asarray(users, dtype=np.int64))
        self.windows = windows
        # "random": one unit per user, its window drawn per epoch among user_windows of them
        self.user_windows = self.num_windows(builder.split.train_len[self.users], builder.max_len)
        counts = self.user_windows if windows == "all" else np.ones(len(self.users), dtype=np.int64)
        self.unit_users = np.repeat(self.users, counts)
        # j = 0, 1, ..., count - 1 within each user
        self.unit_windows = np.arange(len(self.unit_users)) - np.repeat(np.cumsum(counts) - counts, counts)

    @staticmethod
    def num_windows(train_len: np.ndarray, max_len: int) -> np.ndarray:
        """Windows of users with ``train_len`` training events: the last one plus one per earlier
        ``max_len`` events that still have a next event (window j ends at m - 1 - j * max_len >= 1)."""
        m = np.asarray(train_len, dtype=np.int64)
        return 1 + np.maximum(m - 2, 0) // max_len

    def __len__(self) -> int:
        return -(-len(self.unit_users) // self.batch_size)

    def epoch(self, epoch: int, device=None, rank: int = 0, world: int = 1) -> Iterator[TokenBatch]:
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.unit_users))
        num_users = len(self.builder.split.train_len)
        shifts = np.random.default_rng([self.seed, epoch, 1]).integers(0, self.builder.rank_shift + 1, num_users)
        unit_windows = self.unit_windows
        if self.windows == "random":  # one draw per user of the whole data set, whatever the batch split
            draw = np.random.default_rng([self.seed, epoch, 2]).random(num_users)[self.unit_users]
            unit_windows = np.minimum((draw * self.user_windows).astype(np.int64), self.user_windows - 1)
        for step, i in enumerate(range(0, len(order), self.batch_size)):
            part = order[i:i + self.batch_size][rank::world]
            users = self.unit_users[part]
            batch = self.builder.train_batch(users, None, self.candidates, device, windows=unit_windows[part],
                                             shifts=shifts[users])
            batch.seed = int(np.random.SeedSequence([self.seed, epoch, step]).generate_state(1, np.uint64)[0] >> 2)
            yield self.with_augmented_copies(batch) if self.augment else batch

    def with_augmented_copies(self, batch: TokenBatch) -> TokenBatch:
        """The batch followed by one augmented copy of each stream's history (an operator of ``augment``
        drawn per stream, keyed by the batch's key and the user; a masked event becomes item 0), or of
        the streams whose key draws below ``augment_share``: each copied event predicts the copy's next
        event, the last one the original's last target; the copies have no candidates and no profile
        target."""
        from .augment import augment, sequence_keys, uniform
        keys = sequence_keys(batch.seed or 0, 0, batch.users, 9)
        dev = batch.items.device
        chosen = torch.arange(batch.batch_size, device=dev)
        if self.augment_share < 1.0:
            chosen = torch.nonzero(uniform(keys, torch.zeros_like(keys), 11) < self.augment_share).flatten()
        lens0 = batch.offsets[1:] - batch.offsets[:-1]
        take = torch.repeat_interleave(batch.offsets[:-1][chosen], lens0[chosen]) + \
            (torch.arange(int(lens0[chosen].sum()), device=dev) -
             torch.repeat_interleave(torch.cumsum(lens0[chosen], 0) - lens0[chosen], lens0[chosen]))
        sub_off = torch.cat([batch.offsets.new_zeros(1), torch.cumsum(lens0[chosen], 0)])
        items, off, src = augment(batch.items[take], sub_off, keys[chosen], self.augment, mask_id=0,
                                  similar=self.similar)
        src = take[src]
        lens = off[1:] - off[:-1]
        if lens.numel() and int(lens.max()) > self.builder.max_len:  # insert made a copy too long:
            keep = torch.clamp(lens, max=self.builder.max_len)                  # keep its most recent events
            seg = torch.repeat_interleave(torch.arange(lens.numel(), device=items.device), lens)
            pos = torch.arange(items.numel(), device=items.device) - off[:-1][seg]
            sel = pos >= (lens - keep)[seg]
            items, src = items[sel], src[sel]
            off = torch.cat([off.new_zeros(1), torch.cumsum(keep, 0)])
            lens = keep
        nxt = torch.zeros_like(items)
        nxt[:-1] = items[1:]
        has = lens > 0
        last, orig_last = off[1:][has] - 1, batch.offsets[1:][chosen][has] - 1
        nxt[last] = batch.next_items[orig_last]
        nxt_r = None
        if batch.next_ratings is not None:  # the copy's next event's rating, as its next item
            nxt_r = torch.full(items.shape, float("nan"), device=items.device)
            nxt_r[:-1] = batch.ratings[src[1:]]
            nxt_r[last] = batch.next_ratings[orig_last]
        if getattr(self.builder.split, "target_items", None) is not None:  # cross-domain: as TokenBuilder.target_only
            nxt = torch.where(torch.from_numpy(self.builder.split.target_items).to(nxt.device)[nxt], nxt, 0)
        C = chosen.numel()
        cat = torch.cat
        return TokenBatch(
            users=cat([batch.users, batch.users[chosen]]), items=cat([batch.items, items]),
            ratings=None if batch.ratings is None else cat([batch.ratings, batch.ratings[src]]),
            gaps=cat([batch.gaps, batch.gaps[src]]), offsets=cat([batch.offsets, batch.offsets[-1] + off[1:]]),
            next_items=cat([batch.next_items, nxt]),
            first_items=cat([batch.first_items, batch.first_items.new_zeros(C)]),
            cand_items=batch.cand_items, cand_gaps=batch.cand_gaps,
            cand_offsets=cat([batch.cand_offsets, batch.cand_offsets[-1].repeat(C)]),
            cand_ratings=batch.cand_ratings, seed=batch.seed,
            next_ratings=None if nxt_r is None else cat([batch.next_ratings, nxt_r]),
            first_ratings=None if batch.first_ratings is None else cat([batch.first_ratings,
                                                                        batch.first_ratings.new_full((C,), float("nan"))]))


# --------------------------------------------------------------------------- live histories


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

    @classmethod
    def of_user(cls, split: LeaveOneOutSplit, user: int, stage: Optional[str] = None) -> "History":
        """User ``user``'s (internal index) data-set events: all of them (``stage`` None or "test"), or
        those before the test event ("valid")."""
        s, e = int(split.user_offsets[user]), int(split.user_offsets[user + 1])
        if stage == "valid":
            e = int(split.stage_positions("test", np.asarray([user]))[0])
        r = split.ratings[s:e] if split.ratings is not None else np.full(e - s, np.nan, np.float32)
        return cls(split.items[s:e].copy(), r.astype(np.float32), split.timestamps[s:e].copy(), user)

    def concat(self, other: "History") -> "History":
        """This history followed by ``other``'s events (the user of ``self``)."""
        return History(np.concatenate([self.items, other.items]), np.concatenate([self.ratings, other.ratings]),
                       np.concatenate([self.timestamps, other.timestamps]), self.user)


def live_token_batch(histories: Sequence[History], max_len: int, num_time_buckets: int,
                     device=None) -> TokenBatch:
    """The TokenBatch recommending after each history's last event.

    Each stream holds the last ``max_len`` events (gap buckets computed over the whole history, so the
    first kept event keeps its gap to the event before it) and no candidates; ``history_items`` /
    ``history_offsets`` hold every event. Every history must have at least one event (an empty stream
    has no state to read).
    """
    if any(len(h) == 0 for h in histories):
        raise ValueError("live_token_batch: every history needs at least one event")
    full = _offsets([len(h) for h in histories])
    items = np.concatenate([h.items for h in histories]).astype(np.int64)
    ratings = np.concatenate([h.ratings for h in histories]).astype(np.float32)
    gap_bucket = time_buckets(event_gaps(np.concatenate([h.timestamps for h in histories]), full[:-1]),
                              num_time_buckets)
    hist = [(max(int(a), int(b) - max_len), int(b)) for a, b in zip(full[:-1], full[1:])]
    return pack_streams([h.user for h in histories], items, ratings, gap_bucket, hist, [(b, b) for _, b in hist],
                        full[1:], device, history=(items, full))

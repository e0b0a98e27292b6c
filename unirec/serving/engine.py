"""The recommender behind the service: a run's model and data, live histories, cached user states.

:class:`Recommender` answers a batch of :class:`RecommendJob` at once (one forward pass for all
the users whose state is not cached, over the same token batches as training and evaluation,
:func:`unirec.data.live_token_batch`; then the model's scorer, as in evaluation, which ranks with
``unirec.ops.topk_scores``). It is called from one model thread; the event loop only
calls :meth:`Recommender.invalidate` and the id look-ups.

A user's history is the data set's events (in memory) followed by the newest live events (at
most the model's window plus one, the one before the window giving the first event's time gap):
however many events a user posts, a request reads a bounded number of rows (so ``exclude_seen``
leaves out the whole data-set history but only the live events read; dismissals are kept apart and
read whole). Live events by kind:
``view`` (its rating, if any), ``like`` and ``dislike`` (the data's highest and lowest rating)
are tokens of the history; ``skip`` and ``dismiss`` are not, but count as seen for
``exclude_seen``. A dismissed item is never recommended to that user again, and every item is
demoted for that user by ``dismiss_demotion`` x the square of its largest cosine similarity
(clipped at 0) to a dismissed item x the standard deviation of the user's scores over the
catalogue (so that the setting does not depend on the model's score scale; the square makes near
neighbours fall much further than items merely in the same region, which on MovieLens-100K pushed
out fewer unrelated items for the same share of neighbours gone than the plain cosine). Events on
items the model does not know (after a reload to another catalogue) stay in the store and are
skipped.

User states are cached per user id and invalidated by new events: a version counter per user
slot (a fixed table indexed by a hash of the user id, so memory stays bounded however many users
post events; users sharing a slot only invalidate each other's cache) is bumped after an event is
stored; a state computed from a history read under an older version is never served (it is not
stored, or it is found stale), so a recommend that starts after an event was acknowledged always
sees that event.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import History, live_token_batch
from ..runs import Run
from .store import EventStore

TOKEN_KINDS = ("view", "like", "dislike")
DEFAULT_DISMISS_DEMOTION = 1.5
VERSION_SLOTS = 1 << 16
_EMPTY = np.zeros(0, dtype=np.int64)


class ApiError(Exception):
    """A client error: HTTP ``status`` with a message naming ``field``."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


def load_run(run_dir: Union[str, Path], impl: str = "auto"):
    """(model in eval mode on backend ``impl``, LeaveOneOutSplit, model version) of a run folder written
    by ``unirec train``. The version is ``<folder name>@<first 12 hex digits of model.pt's sha256>``."""
    run = Run.open(run_dir)
    return run.load_model(impl), run.load_split(), run.model_version()


@dataclass
class RecommendJob:
    """One recommend request in internal ids.

    user_id: the data set's user id (its data-set and live events are the history), or None with
    ``history`` (1-based item ids in time order) given; candidates: 1-based ids to rank (None = all).
    """

    k: int
    exclude_seen: bool = True
    user_id: Optional[str] = None
    history: Optional[List[int]] = None
    candidates: Optional[np.ndarray] = None


@dataclass
class Ranked:
    """A job's answer: items (1-based) best first with their scores; source "model" or "popular"
    (no history to read); known_user: whether the model has the user (None for a given history)."""

    items: List[int]
    scores: List[float]
    source: str
    known_user: Optional[bool]
    history_length: int


@dataclass
class UserView:
    """What a request knows of a user: the token history, the live window's other seen items
    (skipped, dismissed), every dismissed item (1-based ids), and whether the model knows the user."""

    history: History
    seen: np.ndarray = field(default_factory=lambda: _EMPTY)
    dismissed: np.ndarray = field(default_factory=lambda: _EMPTY)
    known: Optional[bool] = None


@dataclass
class _State:
    version: int
    query: torch.Tensor          # [D]
    view: UserView


@dataclass
class _Prepared:
    view: UserView
    query: Optional[torch.Tensor] = None
    version: int = -1
    row: int = -1                # row in the batch's forward pass

    def excluded(self, exclude_seen: bool) -> np.ndarray:
        """Items the answer must leave out: the dismissed ones, and every seen one with exclude_seen."""
        v = self.view
        if not exclude_seen:
            return v.dismissed
        return np.concatenate([v.history.items, v.seen, v.dismissed]) if len(v.seen) or len(v.dismissed) \
            else v.history.items


class Recommender:
    """A run's model and data plus the event store; see the module docstring.

    cache_size: user states kept (least recently used dropped first); 0 = no cache.
    dismiss_demotion: strength of the demotion of items close to a dismissed one (0 = off).
    """

    def __init__(self, model, split, store: EventStore, version: str = "unversioned", cache_size: int = 10000,
                 metrics=None, dismiss_demotion: float = DEFAULT_DISMISS_DEMOTION):
        if dismiss_demotion < 0:
            raise ValueError(f"dismiss_demotion must be >= 0, got {dismiss_demotion}")
        self.model, self.split, self.store, self.version = model, split, store, version
        self.metrics, self.dismiss_demotion = metrics, float(dismiss_demotion)
        self.config = model.config
        self.schema = model.schema
        ds = split.dataset
        with torch.no_grad():
            self.item_rep = model.item_representations().float()                   # [N + 1, D]
        rep = self.item_rep[1:]
        self._unit_items = torch.nn.functional.normalize(rep, dim=1).contiguous()  # [N, D] for cosine similarity
        centred = rep - rep.mean(0)
        # the scores' variance over the catalogue is q' C q: a user's spread costs D^2, not N x D
        self._item_cov = centred.T @ centred / max(rep.shape[0], 1)                # [D, D]
        self.item_ids = [str(v) for v in ds.item_vocab]
        self.titles = None if ds.item_text is None else [str(t) or None for t in ds.item_text]
        self._titles_lower = None if self.titles is None else [(t or "").lower() for t in self.titles]
        self._item_index = {v: i for i, v in enumerate(self.item_ids) if i}
        self._user_index = {str(v): i for i, v in enumerate(ds.user_vocab) if i}
        pop = split.item_popularity().astype(np.float64)
        pop[0] = -1.0
        self.popular = np.argsort(-pop[1:], kind="stable") + 1                     # 1-based, most popular first
        self.popularity = pop
        self.all_items = np.arange(1, self.num_items + 1, dtype=np.int64)
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, _State]" = OrderedDict()
        self._versions = [0] * VERSION_SLOTS
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ ids

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def item_index(self, item_id: str, field: str, status: int = 422) -> int:
        """The 1-based internal id of a data-set item id; ApiError(``status``) naming ``field`` when unknown."""
        i = self._item_index.get(item_id)
        if i is None:
            raise ApiError(status, field, f"unknown item id {item_id!r} (item ids look like {self.item_ids[1]!r})")
        return i

    def item_of(self, item_id: str) -> Optional[int]:
        """The 1-based internal id of a data-set item id, None when the model does not know it."""
        return self._item_index.get(item_id)

    def user_index(self, user_id: str) -> int:
        """The internal index of a data-set user id, 0 when the model does not know the user."""
        return self._user_index.get(user_id, 0)

    def title(self, item: int) -> Optional[str]:
        """The item's title (None when the data set has no titles)."""
        return None if self.titles is None else self.titles[item]

    def search(self, text: str, k: int) -> List[int]:
        """Up to k items (1-based) whose title contains ``text`` (case-insensitive) or whose id is ``text``,
        most popular first."""
        needle = text.strip().lower()
        hits = [i] if (i := self._item_index.get(text.strip())) else []
        if self._titles_lower is not None and needle:
            hits += [j for j, t in enumerate(self._titles_lower) if j and needle in t and j not in hits]
        hits = np.asarray(hits, dtype=np.int64)
        return hits[np.argsort(-self.popularity[hits], kind="stable")][:k].tolist()

    # ------------------------------------------------------------------ histories and the cache

    def user_view(self, user_id: str) -> UserView:
        """The user's data-set events, then the newest live events (see the module docstring)."""
        u = self.user_index(user_id)
        base = History.of_user(self.split, u) if u else History.of_items([])
        items, ratings, times, seen = [], [], [], []
        lo, hi = float(self.schema.rating_min), float(self.schema.rating_max)
        for e in self.store.events(user_id, limit=self.config.max_len + 1):
            i = self._item_index.get(e.item_id)
            if i is None:
                continue  # an item this model does not know: kept in the store, skipped here
            if e.kind in TOKEN_KINDS:
                items.append(i)
                ratings.append(hi if e.kind == "like" else lo if e.kind == "dislike" else
                               np.nan if e.rating is None else e.rating)
                times.append(e.timestamp)
            else:
                seen.append(i)
        live = History(np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float32),
                       np.asarray(times, dtype=np.float64))
        dismissed = [i for x in self.store.dismissed(user_id) if (i := self._item_index.get(x))]
        return UserView(base.concat(live), np.asarray(seen, dtype=np.int64), np.asarray(dismissed, dtype=np.int64),
                        bool(u))

    def _slot(self, user_id: str) -> int:
        return hash(user_id) & (VERSION_SLOTS - 1)

    def invalidate(self, user_id: str) -> None:
        """Marks the user's cached state stale (called after an event of the user is stored)."""
        with self._lock:
            self._versions[self._slot(user_id)] += 1
            self._cache.pop(user_id, None)

    def _cached(self, user_id: str) -> Tuple[int, Optional[_State]]:
        """(the user's current version, its cached state if still valid, else None)."""
        with self._lock:
            v = self._versions[self._slot(user_id)]
            st = self._cache.get(user_id)
            if st is not None and st.version != v:
                st = None
            if st is not None:
                self._cache.move_to_end(user_id)
        if self.metrics is not None:
            self.metrics.cache.labels("hit" if st is not None else "miss").inc()
        return v, st

    def _remember(self, user_id: str, st: _State) -> None:
        if self.cache_size <= 0:
            return
        with self._lock:
            if self._versions[self._slot(user_id)] != st.version:
                return  # an event arrived while this state was computed
            self._cache[user_id] = st
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------------ answering

    def _prepare(self, job: RecommendJob) -> _Prepared:
        if job.user_id is None:
            return _Prepared(UserView(History.of_items(job.history or [])))
        # the version is read before the history: an event stored after this read bumps it
        v, st = self._cached(job.user_id)
        if st is not None:
            return _Prepared(st.view, st.query, v)
        return _Prepared(self.user_view(job.user_id), None, v)

    @torch.inference_mode()  # cheaper per op than no_grad (no view or version tracking): 1.15 vs 1.4 ms for one user
    def run_batch(self, jobs: Sequence[RecommendJob]) -> List[Union[Ranked, Exception]]:
        """Answers ``jobs`` with one forward pass for every history whose state is not cached.
        Returns one Ranked (or the exception that job raised) per job, in order."""
        out: List[Union[Ranked, Exception, None]] = [None] * len(jobs)
        preps: List[Optional[_Prepared]] = [None] * len(jobs)
        for j, job in enumerate(jobs):
            try:
                preps[j] = self._prepare(job)
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                out[j] = exc
        # one forward pass over the distinct histories that need one
        todo: List[History] = []
        row_of_user: Dict[str, int] = {}
        for job, p in zip(jobs, preps):
            if p is None or p.query is not None or len(p.view.history) == 0:
                continue
            if job.user_id is not None and job.user_id in row_of_user:
                p.row = row_of_user[job.user_id]
                continue
            p.row = len(todo)
            todo.append(p.view.history)
            if job.user_id is not None:
                row_of_user[job.user_id] = p.row
        if todo:
            batch = live_token_batch(todo, self.config.max_len, self.config.num_time_buckets)
            queries = self.model.predict(batch, self.item_rep)["queries"]
            for job, p in zip(jobs, preps):
                if p is not None and p.row >= 0:
                    p.query = queries[p.row].clone()  # a view would keep the whole batch's tensor alive in the cache
                    if job.user_id is not None:
                        self._remember(job.user_id, _State(p.version, p.query, p.view))
        # rank: whole-catalogue jobs without dismissals together (one topk call per exclude flag);
        # candidate jobs and users with dismissals each, over explicit scores
        for flag in (True, False):
            group = [j for j, (job, p) in enumerate(zip(jobs, preps))
                     if p is not None and p.query is not None and job.candidates is None
                     and len(p.view.dismissed) == 0 and job.exclude_seen == flag and out[j] is None]
            if group:
                self._rank_catalogue(jobs, preps, group, flag, out)
        for j, (job, p) in enumerate(zip(jobs, preps)):
            if out[j] is not None or p is None:
                continue
            try:
                out[j] = self._rank_scored(job, p) if p.query is not None else self._rank_popular(job, p)
            except Exception as exc:  # noqa: BLE001
                out[j] = exc
        return out  # type: ignore[return-value]

    def _csr(self, hists: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        off = np.zeros(len(hists) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in hists], out=off[1:])
        items = np.concatenate(hists).astype(np.int64) if hists else np.zeros(0, np.int64)
        return torch.from_numpy(items), torch.from_numpy(off)

    def _rank_catalogue(self, jobs, preps, group, exclude: bool, out) -> None:
        q = torch.stack([preps[j].query for j in group])
        # excluding: every seen item; not excluding: the token history, whose items get repeat offsets
        hi, ho = self._csr([preps[j].excluded(True) if exclude else preps[j].view.history.items for j in group])
        k = min(max(jobs[j].k for j in group), self.num_items)
        vals, idx = self.model.scorer.topk(q, self.item_rep, k, hi, ho, exclude_history=exclude)
        vals, idx = vals.tolist(), idx.tolist()
        for r, j in enumerate(group):
            pairs = [(i, s) for i, s in zip(idx[r], vals[r]) if i > 0][:jobs[j].k]
            p = preps[j]
            out[j] = Ranked([i for i, _ in pairs], [s for _, s in pairs], "model", p.view.known, len(p.view.history))

    def demotion(self, query: torch.Tensor, dismissed: np.ndarray) -> torch.Tensor:
        """[N] the score each item loses for a user with state ``query`` [D] who dismissed ``dismissed``
        (1-based): dismiss_demotion x max over dismissed d of max(0, cos(item, d))^2 x the standard
        deviation of the user's scores over the catalogue."""
        q = query.float()
        spread = torch.sqrt(torch.clamp(q @ self._item_cov @ q, min=0.0))
        cos = self._unit_items[torch.from_numpy(dismissed) - 1] @ self._unit_items.T       # [m, N]
        return self.dismiss_demotion * spread * cos.clamp_min(0.0).amax(0).square()

    def _rank_scored(self, job: RecommendJob, p: _Prepared) -> Ranked:
        """Ranks the candidates (or the whole catalogue) from explicit scores: dismissals demote neighbours."""
        v = p.view
        cands = self.all_items if job.candidates is None else job.candidates
        drop = p.excluded(job.exclude_seen)
        if len(drop):
            cands = cands[~np.isin(cands, drop)]
        if len(cands) == 0:
            return Ranked([], [], "model", v.known, len(v.history))
        hi, ho = self._csr([v.history.items])
        c = torch.from_numpy(cands)
        s = self.model.scorer.item_scores(p.query.view(1, -1), self.item_rep, c.view(1, -1), hi, ho)[0]
        if len(v.dismissed) and self.dismiss_demotion > 0:
            s = s - self.demotion(p.query, v.dismissed)[c - 1]
        vals, order = torch.topk(s, min(job.k, len(cands)))
        return Ranked(cands[order.numpy()].tolist(), vals.tolist(), "model", v.known, len(v.history))

    def _rank_popular(self, job: RecommendJob, p: _Prepared) -> Ranked:
        pool = self.popular if job.candidates is None else \
            job.candidates[np.argsort(-self.popularity[job.candidates], kind="stable")]
        drop = p.excluded(job.exclude_seen)
        if len(drop):
            pool = pool[~np.isin(pool, drop)]
        top = pool[:job.k]
        return Ranked(top.tolist(), self.popularity[top].tolist(), "popular", p.view.known, len(p.view.history))

    # ------------------------------------------------------------------ item neighbours

    @torch.inference_mode()
    def similar(self, item: int, k: int) -> Tuple[List[int], List[float]]:
        """The k items (1-based) most similar to ``item`` by cosine of the model's item representations,
        the item itself excluded (the scorer's top-k)."""
        return self.model.scorer.similar(self._unit_items, item, k)

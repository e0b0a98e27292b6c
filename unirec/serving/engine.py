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

A run of a target domain (``Dataset.target_items``, e.g. ``--domain B``) answers from that domain's
items (and items added through the API): a request without candidates ranks those, as evaluation does.

Items added at serving time (:meth:`Recommender.add_item`: an item nobody has rated, known by its
title, text and attribute values) are represented as the model represents its catalogue, less the
id row (``model.items.represent_new``), and appended to the item side: the representations, the unit
vectors of :meth:`Recommender.similar`, the id maps and the titles. The item side is one immutable
:class:`Catalogue` that an add replaces whole (grown copies, then one assignment): a batch, a search
or a similarity takes the catalogue current when it starts and reads only it, so it never sees a
half-grown table; ids and titles are append-only lists bounded by the catalogue's size. Cached user
states are dropped on an add (a user's stored events on the item now count).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import History, live_token_batch
from ..data.dataset import FeatureValueError
from ..data.readers import TOKEN_KINDS
from ..models.scorer import DEFAULT_DISMISS_DEMOTION, dismissal_demotion, item_covariance
from ..runs import Run
from .store import EventStore, ItemExists

log = logging.getLogger("uvicorn.error")

VERSION_SLOTS = 1 << 16
_EMPTY = np.zeros(0, dtype=np.int64)
TITLE = "title"
MAX_TITLE = 1000


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
    epoch: int = 0               # the recommender's add count when the history was read


@dataclass
class _Prepared:
    view: UserView
    query: Optional[torch.Tensor] = None
    version: int = -1
    row: int = -1                # row in the batch's forward pass
    epoch: int = 0

    def excluded(self, exclude_seen: bool) -> np.ndarray:
        """Items the answer must leave out: the dismissed ones, and every seen one with exclude_seen."""
        v = self.view
        if not exclude_seen:
            return v.dismissed
        return np.concatenate([v.history.items, v.seen, v.dismissed]) if len(v.seen) or len(v.dismissed) \
            else v.history.items


@dataclass(frozen=True)
class Catalogue:
    """The item side at one moment, items 1..n: never changed, replaced whole when items are added.

    rep [n + 1, D] float32 (row 0 = padding); unit [n, D] the L2-normalised rows 1..n (cosine
    similarity); cov [D, D] the rows' covariance (a user's score spread, for dismissals), kept up to
    date from rep_sum [D] and gram [D, D] (float64 sums); popularity [n + 1] ([0] = -1, added items 0);
    popular [n] 1-based, most popular first; all_items [n] = 1..n.
    """

    n: int
    rep: torch.Tensor
    unit: torch.Tensor
    cov: torch.Tensor
    rep_sum: torch.Tensor
    gram: torch.Tensor
    popularity: np.ndarray
    popular: np.ndarray
    all_items: np.ndarray

    @classmethod
    def of(cls, rep: torch.Tensor, popularity: np.ndarray) -> "Catalogue":
        items = rep[1:]
        n = items.shape[0]
        # the scores' variance over the catalogue is q' C q: a user's spread costs D^2, not N x D
        cov = item_covariance(items)
        d = items.double()
        popular = np.argsort(-popularity[1:], kind="stable") + 1
        return cls(n, rep, torch.nn.functional.normalize(items, dim=1).contiguous(), cov, d.sum(0), d.T @ d,
                   popularity, popular, np.arange(1, n + 1, dtype=np.int64))

    def grown(self, rows: torch.Tensor) -> "Catalogue":
        """A new catalogue: this one with ``rows`` [m, D] appended as items n + 1 .. n + m (popularity 0)."""
        rows = rows.to(self.rep.dtype)
        m, n = rows.shape[0], self.n + rows.shape[0]
        d = rows.double()
        s, g = self.rep_sum + d.sum(0), self.gram + d.T @ d
        mean = s / n
        cov = (g / n - torch.outer(mean, mean)).to(self.cov.dtype)
        return Catalogue(n, torch.cat([self.rep, rows]),
                         torch.cat([self.unit, torch.nn.functional.normalize(rows, dim=1)]).contiguous(), cov, s, g,
                         np.concatenate([self.popularity, np.zeros(m)]),
                         np.concatenate([self.popular, np.arange(self.n + 1, n + 1, dtype=np.int64)]),
                         np.arange(1, n + 1, dtype=np.int64))


@dataclass
class NewItems:
    """Items outside the trained catalogue, ready to append: ids, fields (as stored), titles, their
    representations rep [m, D], the rendered texts (None without "lm" text), per item the values that
    the model has no row for (field -> values, left out), and the items left out (restore only:
    (item id, why))."""

    item_ids: List[str]
    fields: List[dict]
    titles: List[str]
    rep: torch.Tensor
    texts: Optional[List[str]] = None
    unknown: List[Dict[str, list]] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)


def random_item_vector(item_id: str, width: int) -> torch.Tensor:
    """[width] a unit Gaussian direction fixed by the item id (the "random" text control for new items)."""
    seed = int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(v, dim=0)


class Recommender:
    """A run's model and data plus the event store; see the module docstring.

    cache_size: user states kept (least recently used dropped first); 0 = no cache.
    dismiss_demotion: strength of the demotion of items close to a dismissed one (0 = off).
    text_home: where the text vectors of added items are cached (``text_home/text/<model>/``; None: the
    shared cache of :func:`unirec.data.text.text_vectors`). The service uses its state folder: a small
    cache of the added items alone, which each add rewrites and each restore reads.
    """

    def __init__(self, model, split, store: EventStore, version: str = "unversioned", cache_size: int = 10000,
                 metrics=None, dismiss_demotion: float = DEFAULT_DISMISS_DEMOTION,
                 text_home: Union[str, Path, None] = None):
        if dismiss_demotion < 0:
            raise ValueError(f"dismiss_demotion must be >= 0, got {dismiss_demotion}")
        self.model, self.split, self.store, self.version = model, split, store, version
        self.metrics, self.dismiss_demotion = metrics, float(dismiss_demotion)
        self.text_home = text_home
        self.config = model.config
        self.schema = model.schema
        ds = split.dataset
        with torch.no_grad():
            rep = model.item_representations().float()                              # [N + 1, D]
        pop = split.item_popularity().astype(np.float64)
        pop[0] = -1.0
        self._cat = Catalogue.of(rep, pop)
        self.trained_items = self._cat.n
        # a target-domain run ranks its domain's items only (1-based ids; None: the whole catalogue)
        self.target_items = None if ds.target_items is None else np.flatnonzero(ds.target_items).astype(np.int64)
        # append-only; entries past the catalogue's n (an add in progress) are not read
        self.item_ids = [str(v) for v in ds.item_vocab]
        self.titles = None if ds.item_text is None else [str(t) or None for t in ds.item_text]
        self._titles_lower = None if self.titles is None else [(t or "").lower() for t in self.titles]
        self._item_index = {v: i for i, v in enumerate(self.item_ids) if i}
        self._user_index = {str(v): i for i, v in enumerate(ds.user_vocab) if i}
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, _State]" = OrderedDict()
        self._versions = [0] * VERSION_SLOTS
        self._epoch = 0                      # items added so far: cached states of an older epoch are stale
        self._lock = threading.Lock()
        self._grow_lock = threading.Lock()

    # ------------------------------------------------------------------ the item side (current catalogue)

    @property
    def catalogue(self) -> Catalogue:
        """The current item side (replaced whole by an add; read it once per computation)."""
        return self._cat

    @property
    def item_rep(self) -> torch.Tensor:
        return self._cat.rep

    @property
    def _unit_items(self) -> torch.Tensor:
        return self._cat.unit

    @property
    def _item_cov(self) -> torch.Tensor:
        return self._cat.cov

    @property
    def popularity(self) -> np.ndarray:
        return self._cat.popularity

    @property
    def popular(self) -> np.ndarray:
        return self._cat.popular

    @property
    def all_items(self) -> np.ndarray:
        return self._cat.all_items

    @property
    def num_items(self) -> int:
        return self._cat.n

    @property
    def added_items(self) -> int:
        """Items added at serving time (they follow the trained catalogue's)."""
        return self._cat.n - self.trained_items

    # ------------------------------------------------------------------ ids

    def item_index(self, item_id: str, field: str, status: int = 422) -> int:
        """The 1-based internal id of a data-set item id; ApiError(``status``) naming ``field`` when unknown."""
        i = self.item_of(item_id)
        if i is None:
            raise ApiError(status, field, f"unknown item id {item_id!r} (item ids look like {self.item_ids[1]!r})")
        return i

    def item_of(self, item_id: str, cat: Optional[Catalogue] = None) -> Optional[int]:
        """The 1-based internal id of an item id (the data set's or an added item's), None when unknown."""
        i = self._item_index.get(item_id)
        return i if i is not None and i <= (cat or self._cat).n else None

    def user_index(self, user_id: str) -> int:
        """The internal index of a data-set user id, 0 when the model does not know the user."""
        return self._user_index.get(user_id, 0)

    def title(self, item: int) -> Optional[str]:
        """The item's title (None when the data set has no titles)."""
        titles = self.titles
        return None if titles is None else titles[item]

    def search(self, text: str, k: int) -> List[int]:
        """Up to k items (1-based) whose title contains ``text`` (case-insensitive) or whose id is ``text``,
        most popular first."""
        cat = self._cat
        needle = text.strip().lower()
        hits = [i] if (i := self.item_of(text.strip(), cat)) else []
        lower = self._titles_lower
        if lower is not None and needle:
            hits += [j for j in range(1, cat.n + 1) if needle in lower[j] and j not in hits]
        hits = np.asarray(hits, dtype=np.int64)
        return hits[np.argsort(-cat.popularity[hits], kind="stable")][:k].tolist()

    # ------------------------------------------------------------------ histories and the cache

    def user_view(self, user_id: str, cat: Optional[Catalogue] = None) -> UserView:
        """The user's data-set events, then the newest live events (see the module docstring); item ids
        are mapped within catalogue ``cat`` (default: the current one)."""
        cat = cat or self._cat
        u = self.user_index(user_id)
        base = History.of_user(self.split, u) if u else History.of_items([])
        items, ratings, times, seen = [], [], [], []
        lo, hi = float(self.schema.rating_min), float(self.schema.rating_max)
        for e in self.store.events(user_id, limit=self.config.max_len + 1):
            i = self.item_of(e.item_id, cat)
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
        dismissed = [i for x in self.store.dismissed(user_id) if (i := self.item_of(x, cat))]
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
            if st is not None and (st.version != v or st.epoch != self._epoch):
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
            if self._versions[self._slot(user_id)] != st.version or self._epoch != st.epoch:
                return  # an event (or an item) arrived while this state was computed
            self._cache[user_id] = st
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------------ answering

    def _prepare(self, job: RecommendJob, cat: Optional[Catalogue] = None, epoch: Optional[int] = None) -> _Prepared:
        if epoch is None:  # read before the catalogue (see run_batch)
            epoch = self._epoch
        cat = cat or self._cat
        if job.user_id is None:
            return _Prepared(UserView(History.of_items(job.history or [])))
        # the version is read before the history: an event stored after this read bumps it
        v, st = self._cached(job.user_id)
        if st is not None:
            return _Prepared(st.view, st.query, v, epoch=epoch)
        return _Prepared(self.user_view(job.user_id, cat), None, v, epoch=epoch)

    @torch.inference_mode()  # cheaper per op than no_grad (no view or version tracking): 1.15 vs 1.4 ms for one user
    def run_batch(self, jobs: Sequence[RecommendJob]) -> List[Union[Ranked, Exception]]:
        """Answers ``jobs`` with one forward pass for every history whose state is not cached.
        Returns one Ranked (or the exception that job raised) per job, in order."""
        # the epoch before the catalogue: an add swaps the catalogue, then bumps the epoch, so a state
        # read under the new epoch was read from the new catalogue (and an older one is not cached)
        epoch = self._epoch
        cat = self._cat
        if self.target_items is not None:
            domain = np.concatenate([self.target_items, np.arange(self.trained_items + 1, cat.n + 1, dtype=np.int64)])
            jobs = [job if job.candidates is not None else replace(job, candidates=domain) for job in jobs]
        out: List[Union[Ranked, Exception, None]] = [None] * len(jobs)
        preps: List[Optional[_Prepared]] = [None] * len(jobs)
        for j, job in enumerate(jobs):
            try:
                preps[j] = self._prepare(job, cat, epoch)
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
            queries = self.model.predict(batch, cat.rep)["queries"]
            for job, p in zip(jobs, preps):
                if p is not None and p.row >= 0:
                    p.query = queries[p.row].clone()  # a view would keep the whole batch's tensor alive in the cache
                    if job.user_id is not None:
                        self._remember(job.user_id, _State(p.version, p.query, p.view, p.epoch))
        # rank: whole-catalogue jobs without dismissals together (one topk call per exclude flag);
        # candidate jobs and users with dismissals each, over explicit scores
        for flag in (True, False):
            group = [j for j, (job, p) in enumerate(zip(jobs, preps))
                     if p is not None and p.query is not None and job.candidates is None
                     and len(p.view.dismissed) == 0 and job.exclude_seen == flag and out[j] is None]
            if group:
                self._rank_catalogue(jobs, preps, group, flag, out, cat)
        for j, (job, p) in enumerate(zip(jobs, preps)):
            if out[j] is not None or p is None:
                continue
            try:
                out[j] = self._rank_scored(job, p, cat) if p.query is not None else self._rank_popular(job, p, cat)
            except Exception as exc:  # noqa: BLE001
                out[j] = exc
        return out  # type: ignore[return-value]

    def _csr(self, hists: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        off = np.zeros(len(hists) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in hists], out=off[1:])
        items = np.concatenate(hists).astype(np.int64) if hists else np.zeros(0, np.int64)
        return torch.from_numpy(items), torch.from_numpy(off)

    def _rank_catalogue(self, jobs, preps, group, exclude: bool, out, cat: Catalogue) -> None:
        q = torch.stack([preps[j].query for j in group])
        # excluding: every seen item; not excluding: the token history, whose items get repeat offsets
        hi, ho = self._csr([preps[j].excluded(True) if exclude else preps[j].view.history.items for j in group])
        k = min(max(jobs[j].k for j in group), cat.n)
        depth = min(max(k, self.model.config.rerank_depth), cat.n) if self.model.reranks else k
        vals, idx = self.model.scorer.topk(q, cat.rep, depth, hi, ho, exclude_history=exclude)
        vals, idx = self.model.rerank_top(q, cat.rep, vals, idx, k)
        vals, idx = vals.tolist(), idx.tolist()
        for r, j in enumerate(group):
            pairs = [(i, s) for i, s in zip(idx[r], vals[r]) if i > 0][:jobs[j].k]
            p = preps[j]
            out[j] = Ranked([i for i, _ in pairs], [s for _, s in pairs], "model", p.view.known, len(p.view.history))

    def demotion(self, query: torch.Tensor, dismissed: np.ndarray, cat: Optional[Catalogue] = None) -> torch.Tensor:
        """[N] the score each item loses for a user with state ``query`` [D] who dismissed ``dismissed``
        (1-based): :func:`unirec.models.scorer.dismissal_demotion` at ``dismiss_demotion``."""
        cat = cat or self._cat
        return dismissal_demotion(query.view(1, -1), cat.unit, cat.cov, torch.from_numpy(dismissed).view(1, -1),
                                  self.dismiss_demotion)[0]

    def _rank_scored(self, job: RecommendJob, p: _Prepared, cat: Catalogue) -> Ranked:
        """Ranks the candidates (or the whole catalogue) from explicit scores: dismissals demote neighbours."""
        v = p.view
        cands = cat.all_items if job.candidates is None else job.candidates
        drop = p.excluded(job.exclude_seen)
        if len(drop):
            cands = cands[~np.isin(cands, drop)]
        if len(cands) == 0:
            return Ranked([], [], "model", v.known, len(v.history))
        hi, ho = self._csr([v.history.items])
        c = torch.from_numpy(cands)
        s = self.model.scorer.item_scores(p.query.view(1, -1), cat.rep, c.view(1, -1), hi, ho)[0]
        if len(v.dismissed) and self.dismiss_demotion > 0:
            s = s - self.demotion(p.query, v.dismissed, cat)[c - 1]
        depth = max(job.k, self.model.config.rerank_depth) if self.model.reranks else job.k
        vals, order = torch.topk(s, min(depth, len(cands)))
        vals, items = self.model.rerank_top(p.query.view(1, -1), cat.rep, vals.view(1, -1),
                                            c[order].view(1, -1), job.k)
        keep = items[0] > 0
        return Ranked(items[0][keep].tolist(), vals[0][keep].tolist(), "model", v.known, len(v.history))

    def _rank_popular(self, job: RecommendJob, p: _Prepared, cat: Catalogue) -> Ranked:
        pool = cat.popular if job.candidates is None else \
            job.candidates[np.argsort(-cat.popularity[job.candidates], kind="stable")]
        drop = p.excluded(job.exclude_seen)
        if len(drop):
            pool = pool[~np.isin(pool, drop)]
        top = pool[:job.k]
        return Ranked(top.tolist(), cat.popularity[top].tolist(), "popular", p.view.known, len(p.view.history))

    # ------------------------------------------------------------------ item neighbours

    @torch.inference_mode()
    def similar(self, item: int, k: int) -> Tuple[List[int], List[float]]:
        """The k items (1-based) most similar to ``item`` by cosine of the model's item representations,
        the item itself excluded (the scorer's top-k)."""
        return self.model.scorer.similar(self._cat.unit, item, k)

    # ------------------------------------------------------------------ items added at serving time

    def item_fields(self) -> List[str]:
        """The fields a new item may have: "title", then the data set's item features."""
        ft = self.split.dataset.item_features
        return [TITLE] + ([f.name for f in ft.features if f.name != TITLE] if ft is not None else [])

    def new_item_problem(self) -> Optional[str]:
        """Why this model cannot represent an item outside its catalogue (None: it can)."""
        items = self.model.items
        if not hasattr(items, "represent_new"):
            return ("this model's item id table is sharded (shard_items), which represents no item outside "
                    "its catalogue")
        if not self.config.text and not items.with_attributes:
            return ("this model represents an item by its id alone (no text, no item attributes), so it cannot "
                    "represent an item it was not trained on; serve a model trained with item text (unirec "
                    "train --text) or with item attributes")
        ft = self.split.dataset.item_features
        if items.with_attributes and (ft is None or ft.table_sizes(False) != list(self.schema.item_feature_sizes)):
            return "the run's data set's item features do not match the model's attribute tables"
        return None

    def _check_fields(self, fields: Mapping[str, Any], names: Sequence[str]) -> Dict[str, list]:
        """Validates one new item's fields (ApiError 422 naming the field); returns the values the model
        has no row for (field -> values)."""
        if not isinstance(fields, Mapping):
            raise ApiError(422, "fields", f"expected an object of field values, got {type(fields).__name__}")
        for name in fields:
            if name not in names:
                raise ApiError(422, f"fields.{name}", f"unknown field; the fields are {', '.join(names)}")
        title = fields.get(TITLE)
        if title is None:
            raise ApiError(422, f"fields.{TITLE}", "required: the item's title, a non-empty string")
        if not isinstance(title, str):
            raise ApiError(422, f"fields.{TITLE}", f"expected a string, got {type(title).__name__}")
        if not title.strip():
            raise ApiError(422, f"fields.{TITLE}", "must not be empty")
        if len(title) > MAX_TITLE:
            raise ApiError(422, f"fields.{TITLE}", f"at most {MAX_TITLE} characters, got {len(title)}")
        ft = self.split.dataset.item_features
        unknown: Dict[str, list] = {}
        if ft is None:
            return unknown
        skipped: list = []
        try:
            bags = ft.bags_of_values([fields], ignore=[TITLE], skipped=skipped)
        except FeatureValueError as exc:
            raise ApiError(422, f"fields.{exc.field}", exc.message) from None
        for _, name, value in skipped:
            unknown.setdefault(name, []).append(value)
        if not self.config.text and bags.indices.numel() == 0:
            raise ApiError(422, "fields", "none of the attribute values given is known to the model, which knows a "
                                          "new item by its attributes alone: give at least one known value of "
                                          + ", ".join(f.name for f in ft.features))
        return unknown

    def _lm_vectors(self, fields: List[dict]) -> Tuple[List[str], torch.Tensor]:
        """The texts of new items (the model's template over their fields) and their vectors [m, E]."""
        try:
            from ..data import text as T
            ds = self.split.dataset
            try:
                template = self.config.text_template or T.default_template(ds)
                base = dict.fromkeys(T.item_field_names(ds))
                texts = [T.render_item_text(template, {**base, TITLE: None, **f}) for f in fields]
            except ValueError as exc:
                raise ApiError(422, "fields", f"cannot make the item's text: {exc}") from None
            kw = {} if self.text_home is None else {"home": self.text_home}
            vectors = np.asarray(T.text_vectors(texts, self.config.text_model, **kw), dtype=np.float32)
        except ImportError as exc:  # TextFeaturesUnavailable is one
            raise ApiError(503, "text", f"item text features are unavailable: {exc}") from None
        return texts, torch.from_numpy(vectors)

    def represent_new_items(self, items: Sequence[Tuple[str, Mapping[str, Any]]], strict: bool = True) -> NewItems:
        """The representations of items outside the catalogue from their fields (see :meth:`add_item`).

        strict: any bad item raises its ApiError; otherwise (restoring stored items into a model that
        may have other features) unknown field names are dropped and bad items left out (``failed``).
        ApiError 422 "model" when the model cannot represent new items, 503 "text" when its text
        features are unavailable (both whatever ``strict``).
        """
        why = self.new_item_problem()
        if why is not None:
            raise ApiError(422, "model", why)
        names = self.item_fields()
        keep = set(names)
        out = NewItems([], [], [], torch.zeros(0))
        for item_id, fields in items:
            f = dict(fields) if strict else {k: v for k, v in dict(fields).items() if k in keep}
            try:
                unknown = self._check_fields(f, names)
            except ApiError as exc:
                if strict:
                    raise
                out.failed.append((item_id, f"{exc.field}: {exc.message}"))
                continue
            out.item_ids.append(item_id)
            out.fields.append(f)
            out.titles.append(f[TITLE])
            out.unknown.append(unknown)
        m = len(out.item_ids)
        if m == 0:
            return out
        text_vectors = None
        if self.config.text == "random":
            width = self.model.items.text.vectors.shape[1]
            text_vectors = torch.stack([random_item_vector(i, width) for i in out.item_ids])
        elif self.config.text:
            out.texts, text_vectors = self._lm_vectors(out.fields)
        bags = None
        if self.model.items.with_attributes:
            b = self.split.dataset.item_features.bags_of_values(out.fields, ignore=[TITLE])
            bags = (b.indices, b.offsets)
        with torch.inference_mode():
            out.rep = self.model.items.represent_new(m, text_vectors, bags).float().cpu()
        return out

    def append_items(self, new: NewItems) -> List[int]:
        """Appends represented items to the catalogue (the caller has checked their ids are new) and returns
        their 1-based ids. The grown catalogue is built aside and swapped in with one assignment; cached
        user states are dropped."""
        if not new.item_ids:
            return []
        with self._grow_lock:
            cat = self._cat
            first = cat.n + 1
            if any(i in self._item_index for i in new.item_ids) or len(set(new.item_ids)) < len(new.item_ids):
                raise ValueError("append_items: an item id is already in the catalogue")
            if self.titles is None:
                titles = [None] * (cat.n + 1)
                self.titles, self._titles_lower = titles, [""] * (cat.n + 1)
            self.item_ids.extend(new.item_ids)
            self.titles.extend(new.titles)
            self._titles_lower.extend((t or "").lower() for t in new.titles)
            for j, item_id in enumerate(new.item_ids):
                self._item_index[item_id] = first + j
            self._cat = cat.grown(new.rep)
            with self._lock:
                self._epoch += 1
                self._cache.clear()
        return list(range(first, first + len(new.item_ids)))

    def add_item(self, item_id: str, fields: Mapping[str, Any]) -> dict:
        """Adds an item nobody has rated: represents it from its fields ("title", required, and the data
        set's item features: :meth:`unirec.data.FeatureTable.bags_of_values`; with "lm" text, the model's
        template over them), stores it (durable before this returns) and appends it to the catalogue, so
        that it is recommendable and similar to others at once. Adds must be serialised by the caller
        (the service holds one lock over adds and reloads).

        Returns {"item_id", "index", "title", "text", "unknown_values"}. ApiError: 409 the id is known or
        already stored; 422 a bad field (named) or a model that cannot represent new items; 503 text
        features unavailable.
        """
        i = self.item_of(item_id)
        if i is not None:
            how = "was already added" if i > self.trained_items else "is already in the model's catalogue"
            raise ApiError(409, "item_id", f"item {item_id!r} {how}")
        stored = self.store.item(item_id)
        if stored is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stored.added_at))
            raise ApiError(409, "item_id", f"item {item_id!r} was already added (at {when}; this model could "
                                           "not restore it)")
        new = self.represent_new_items([(item_id, fields)])
        try:
            self.store.add_item(item_id, new.fields[0])
        except ItemExists:
            raise ApiError(409, "item_id", f"item {item_id!r} was already added") from None
        index = self.append_items(new)[0]
        return {"item_id": item_id, "index": index, "title": new.titles[0],
                "text": None if new.texts is None else new.texts[0], "unknown_values": new.unknown[0]}

    def restore_items(self) -> int:
        """Appends the stored added items that this model does not know (at start-up and after a reload);
        returns how many. Items that cannot be represented are logged and left out (they stay stored)."""
        stored = [s for s in self.store.items() if self.item_of(s.item_id) is None]
        if not stored:
            return 0
        t0 = time.perf_counter()
        try:
            new = self.represent_new_items([(s.item_id, s.fields) for s in stored], strict=False)
        except Exception as exc:  # noqa: BLE001 - the model serves without them; they stay stored
            log.warning("unirec: %d stored added item(s) not restored into %s: %s", len(stored), self.version, exc)
            return 0
        for item_id, why in new.failed:
            log.warning("unirec: stored added item %r not restored into %s: %s", item_id, self.version, why)
        self.append_items(new)
        log.info("unirec: restored %d added item(s) into %s in %.2f s", len(new.item_ids), self.version,
                 time.perf_counter() - t0)
        return len(new.item_ids)

"""The recommender behind the service: a run's model and data, live histories, cached user states.

:class:`Recommender` answers a batch of :class:`RecommendJob` at once (one forward pass for all
the users whose state is not cached, over the same token batches as training and evaluation,
:func:`unirec.data.live_token_batch`; then the model's scorer, as in evaluation, which ranks with
``unirec.ops.topk_scores``). It is called from one worker thread; the event loop only
calls :meth:`Recommender.invalidate` and the id look-ups.

User states are cached per user id and invalidated by new events: a version counter per user is
bumped after an event is stored; a state computed from a history read under an older version is
never served (it is not stored, or it is found stale), so a recommend that starts after an
event was acknowledged always sees that event.
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
class _State:
    version: int
    query: torch.Tensor          # [D]
    history: np.ndarray          # [n] 1-based items, every event
    known: bool


@dataclass
class _Prepared:
    history: History
    known: Optional[bool]
    query: Optional[torch.Tensor] = None
    version: int = -1
    row: int = -1                # row in the batch's forward pass
    extra: Dict = field(default_factory=dict)


class Recommender:
    """A run's model and data plus the event store; see the module docstring.

    cache_size: user states kept (least recently used dropped first); 0 = no cache.
    """

    def __init__(self, model, split, store: EventStore, version: str = "unversioned", cache_size: int = 10000,
                 metrics=None):
        self.model, self.split, self.store, self.version = model, split, store, version
        self.metrics = metrics
        self.config = model.config
        ds = split.dataset
        with torch.no_grad():
            self.item_rep = model.item_representations().float()                   # [N + 1, D]
        norm = torch.nn.functional.normalize(self.item_rep[1:], dim=1)
        self._unit_items = norm.contiguous()                                        # [N, D] for cosine similarity
        self.item_ids = [str(v) for v in ds.item_vocab]
        self.titles = None if ds.item_text is None else [str(t) or None for t in ds.item_text]
        self._item_index = {v: i for i, v in enumerate(self.item_ids) if i}
        self._user_index = {str(v): i for i, v in enumerate(ds.user_vocab) if i}
        pop = split.item_popularity().astype(np.float64)
        pop[0] = -1.0
        self.popular = np.argsort(-pop[1:], kind="stable") + 1                     # 1-based, most popular first
        self.popularity = pop
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, _State]" = OrderedDict()
        self._versions: Dict[str, int] = {}
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

    def user_index(self, user_id: str) -> int:
        """The internal index of a data-set user id, 0 when the model does not know the user."""
        return self._user_index.get(user_id, 0)

    def title(self, item: int) -> Optional[str]:
        return None if self.titles is None else self.titles[item]

    # ------------------------------------------------------------------ histories and the cache

    def user_history(self, user_id: str) -> Tuple[History, bool]:
        """(data-set events then live events, known to the model) of a user."""
        u = self.user_index(user_id)
        base = History.of_user(self.split, u) if u else History.of_items([])
        live = [e for e in self.store.events(user_id) if e.item_id in self._item_index]
        extra = History(np.asarray([self._item_index[e.item_id] for e in live], dtype=np.int64),
                        np.asarray([np.nan if e.rating is None else e.rating for e in live], dtype=np.float32),
                        np.asarray([e.timestamp for e in live], dtype=np.float64))
        return base.concat(extra), bool(u)

    def invalidate(self, user_id: str) -> None:
        """Marks the user's cached state stale (called after an event of the user is stored)."""
        with self._lock:
            self._versions[user_id] = self._versions.get(user_id, 0) + 1
            self._cache.pop(user_id, None)

    def _cached(self, user_id: str) -> Tuple[int, Optional[_State]]:
        """(the user's current version, its cached state if still valid, else None)."""
        with self._lock:
            v = self._versions.get(user_id, 0)
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
            if self._versions.get(user_id, 0) != st.version:
                return  # an event arrived while this state was computed
            self._cache[user_id] = st
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------------ answering

    def _prepare(self, job: RecommendJob) -> _Prepared:
        if job.user_id is None:
            return _Prepared(History.of_items(job.history or []), None)
        # the version is read before the history: an event stored after this read bumps it
        v, st = self._cached(job.user_id)
        if st is not None:
            return _Prepared(History.of_items(st.history), st.known, st.query, v)
        hist, known = self.user_history(job.user_id)
        return _Prepared(hist, known, None, v)

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
            if p is None or p.query is not None or len(p.history) == 0:
                continue
            if job.user_id is not None and job.user_id in row_of_user:
                p.row = row_of_user[job.user_id]
                continue
            p.row = len(todo)
            todo.append(p.history)
            if job.user_id is not None:
                row_of_user[job.user_id] = p.row
        if todo:
            batch = live_token_batch(todo, self.config.max_len, self.config.num_time_buckets)
            queries = self.model.predict(batch, self.item_rep)["queries"]
            for job, p in zip(jobs, preps):
                if p is not None and p.row >= 0:
                    p.query = queries[p.row].clone()  # a view would keep the whole batch's tensor alive in the cache
                    if job.user_id is not None:
                        self._remember(job.user_id, _State(p.version, p.query, p.history.items, bool(p.known)))
        # rank: whole-catalogue jobs together (one topk_items call per exclude flag), candidate jobs each
        for flag in (True, False):
            group = [j for j, (job, p) in enumerate(zip(jobs, preps))
                     if p is not None and p.query is not None and job.candidates is None
                     and job.exclude_seen == flag and out[j] is None]
            if group:
                self._rank_catalogue(jobs, preps, group, flag, out)
        for j, (job, p) in enumerate(zip(jobs, preps)):
            if out[j] is not None or p is None:
                continue
            try:
                out[j] = self._rank_candidates(job, p) if p.query is not None and job.candidates is not None \
                    else self._rank_popular(job, p)
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
        hi, ho = self._csr([preps[j].history.items for j in group])
        k = min(max(jobs[j].k for j in group), self.num_items)
        vals, idx = self.model.scorer.topk(q, self.item_rep, k, hi, ho, exclude_history=exclude)
        vals, idx = vals.tolist(), idx.tolist()
        for r, j in enumerate(group):
            pairs = [(i, s) for i, s in zip(idx[r], vals[r]) if i > 0][:jobs[j].k]
            p = preps[j]
            out[j] = Ranked([i for i, _ in pairs], [s for _, s in pairs], "model", p.known, len(p.history))

    def _rank_candidates(self, job: RecommendJob, p: _Prepared) -> Ranked:
        cands = job.candidates
        if job.exclude_seen:
            cands = cands[~np.isin(cands, p.history.items)]
        if len(cands) == 0:
            return Ranked([], [], "model", p.known, len(p.history))
        hi, ho = self._csr([p.history.items])
        s = self.model.scorer.item_scores(p.query.view(1, -1), self.item_rep, torch.from_numpy(cands).view(1, -1),
                                          hi, ho)[0]
        order = torch.argsort(s, descending=True, stable=True)[:job.k]
        return Ranked(cands[order.numpy()].tolist(), s[order].tolist(), "model", p.known, len(p.history))

    def _rank_popular(self, job: RecommendJob, p: _Prepared) -> Ranked:
        pool = self.popular if job.candidates is None else \
            job.candidates[np.argsort(-self.popularity[job.candidates], kind="stable")]
        if job.exclude_seen and len(p.history):
            pool = pool[~np.isin(pool, p.history.items)]
        top = pool[:job.k]
        return Ranked(top.tolist(), self.popularity[top].tolist(), "popular", p.known, len(p.history))

    # ------------------------------------------------------------------ item neighbours

    @torch.inference_mode()
    def similar(self, item: int, k: int) -> Tuple[List[int], List[float]]:
        """The k items (1-based) most similar to ``item`` by cosine of the model's item representations,
        the item itself excluded (the scorer's top-k)."""
        return self.model.scorer.similar(self._unit_items, item, k)

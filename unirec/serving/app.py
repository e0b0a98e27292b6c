"""The HTTP service: a FastAPI app over a run folder (see :func:`create_app`; ``unirec serve`` runs it).

Endpoints (JSON; ids are the data set's own, as strings):

- ``POST /v1/recommend`` {user_id | history, k, exclude_seen, candidates} -> ranked items with titles
- ``POST /v1/events`` {user_id, item_id, kind?, timestamp?, rating?} -> 201 once the event is durable
- ``POST /v1/items`` {item_id, fields: {title, <item feature>: value, ...}} -> 201: an item nobody has
  rated, recommendable and similar to others at once (kept in SQLite, added again to every model loaded)
- ``GET /v1/items/{item_id}/similar?k=``, ``GET /v1/items?q=&k=`` (title search),
  ``GET /v1/users/{user_id}/history``
- ``POST /v1/admin/reload`` {run_dir?}: swap in a new model version (also SIGHUP under ``unirec serve``)
- ``GET /`` a page to try the service on; ``GET /healthz``, ``GET /metrics`` (Prometheus text),
  ``GET /openapi.json``, ``GET /docs``

``POST /v1/recommend``, the hot endpoint, is answered by :class:`ServiceMiddleware` ahead of FastAPI's
own layers and routing (the same validation, answer and errors; a body it cannot take goes on to the
route, which names what is wrong), and a lone request runs its model call in the event loop's thread
(see :mod:`unirec.serving.batcher`); the route stays for the OpenAPI docs and for those bodies.

Every client error is a 4xx whose ``detail`` names the field ("k: Input should be less than or
equal to 1000"), with the list of ``errors`` ({field, message}) for validation errors. Overload is
a 429 (the request queue is full) and a missed deadline a 503, both with ``Retry-After``.

A reload builds the new :class:`Recommender` beside the serving one and then swaps the reference:
each request takes the recommender current when it starts and keeps it to the end (its ids are
translated, ranked and named by that one model), so requests in flight finish on the old model and
later ones use the new; the new one starts with an empty user-state cache over the same event store.

Adds (``POST /v1/items``) run one at a time in their own thread, under a lock that a reload also takes
while it adds the stored items to the new model and swaps it in: an add lands either in the old model
before the new one restores the store, or in the new one.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import math
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import numpy as np
from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StringConstraints
from pydantic import model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import DeadlineExceeded, MicroBatcher, QueueFull
from .engine import DEFAULT_DISMISS_DEMOTION, ApiError, Recommender, RecommendJob, load_run
from .metrics import Metrics, endpoint_label
from .store import KINDS, EventStore

API_KEY_HEADER = "X-API-Key"
MAX_K = 1000
MAX_LIST = 10000
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1
log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: shown at its log level


def _id(v: Any) -> Any:
    # ids are strings; an integer (MovieLens ids typed as numbers) is taken as its decimal string
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return v


Id = Annotated[str, BeforeValidator(_id), StringConstraints(strict=True, min_length=1, max_length=256)]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K, description="how many items (1..1000)")]


class RecommendRequest(BaseModel):
    """Exactly one of ``user_id`` (data-set and live events) or ``history`` (item ids, oldest first)."""

    model_config = ConfigDict(extra="forbid")
    user_id: Optional[Id] = Field(None, description="the data set's user id; unknown users use their live events")
    history: Optional[List[Id]] = Field(None, max_length=MAX_LIST, description="item ids in time order, used as given")
    k: K = 10
    exclude_seen: StrictBool = Field(True, description="leave out items already in the history (dismissed items "
                                                       "are always left out)")
    candidates: Optional[List[Id]] = Field(None, min_length=1, max_length=MAX_LIST,
                                           description="rank only these item ids")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class ItemScore(BaseModel):
    item_id: str
    score: float
    title: Optional[str] = None
    added: Optional[bool] = Field(None, description="true for an item added at serving time (absent otherwise)")


class RecommendResponse(BaseModel):
    model_version: str
    user_id: Optional[str] = None
    known_user: Optional[bool] = Field(None, description="the model has this user (null for a given history)")
    source: str = Field(description='"model", or "popular" when there is no history to read')
    history_length: int
    items: List[ItemScore]


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    kind: Literal[KINDS] = Field("view", description="view (rated or not), like, dislike, dismiss (not "
                                                     "interested: never recommended again, similar items "
                                                     "demoted), skip")
    timestamp: Optional[Annotated[float, Field(allow_inf_nan=False, ge=0)]] = Field(
        None, description="seconds since the epoch (default: when it is received)")
    rating: Optional[Annotated[float, Field(allow_inf_nan=False)]] = Field(None, description="only with kind view")


class EventResponse(BaseModel):
    event_id: int
    user_id: str
    item_id: str
    kind: str
    timestamp: float
    rating: Optional[float] = None


class HistoryEvent(BaseModel):
    item_id: str
    title: Optional[str] = None
    timestamp: Optional[float] = None
    rating: Optional[float] = None
    kind: str = "view"
    source: str = Field(description='"dataset" or "live"')


class HistoryResponse(BaseModel):
    user_id: str
    known_user: bool
    events: List[HistoryEvent]


class SimilarResponse(BaseModel):
    model_version: str
    item_id: str
    title: Optional[str] = None
    items: List[ItemScore]


class ItemHit(BaseModel):
    item_id: str
    title: Optional[str] = None
    popularity: float
    added: Optional[bool] = Field(None, description="true for an item added at serving time (absent otherwise)")


class AddItemRequest(BaseModel):
    """An item nobody has rated yet. ``fields``: "title" (required) and any of the data set's item features
    (a categorical one a string, a multi-valued one a list of strings, a numeric one a number), e.g.
    {"title": "Heat", "genre": ["Action", "Crime"], "release_year": 1995}; values the model has no
    embedding for are left out (and listed in the answer's ``unknown_values``)."""

    model_config = ConfigDict(extra="forbid")
    item_id: Id = Field(description="the new item's id (not in the catalogue, not added before)")
    fields: Dict[str, Any] = Field(description="title and item feature values (see GET /healthz: item_fields)")


class AddItemResponse(BaseModel):
    model_version: str
    item_id: str
    index: int = Field(description="the item's internal 1-based index (after the trained catalogue's)")
    title: str
    text: Optional[str] = Field(None, description="the text the model embedded (a model with item text)")
    unknown_values: Dict[str, List[Any]] = Field(description="field -> values the model does not know, left out")
    seconds: float = Field(description="how long the add took on the server")


class SearchResponse(BaseModel):
    items: List[ItemHit]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_dir: Optional[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=4096)]] = Field(
        None, description="run folder on the server (default: the one it was started with, read again)")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    seconds: float


# --------------------------------------------------------------------------- errors


def _field(loc) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")] if len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _message(err: dict, request: Request) -> str:
    msg = err.get("msg", "invalid")
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        pos = err["loc"][-1] if isinstance(err["loc"][-1], int) else "?"
        return f"invalid JSON at character {pos}: {ctx.get('error', msg)}"
    if err.get("type") == "model_attributes_type" and tuple(err.get("loc", ())) == ("body",):
        ct = request.headers.get("content-type", "")
        if "json" not in ct:
            return f"expected a JSON object with Content-Type: application/json (got {ct or 'no content type'!r})"
        return "expected a JSON object"
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _error(status: int, errors: List[dict]) -> JSONResponse:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=status, content={"detail": detail, "errors": errors})


def _busy(message: str) -> JSONResponse:
    return JSONResponse(status_code=429, content={"detail": f"server busy: {message}; retry after {RETRY_AFTER_S} s"},
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def _late(exc: DeadlineExceeded) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": f"deadline: {exc} (server overloaded); retry after "
                                                            f"{RETRY_AFTER_S} s"},
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def _refusal(exc: Exception) -> JSONResponse:
    """The answer to a request that raised ApiError, QueueFull or DeadlineExceeded."""
    if isinstance(exc, ApiError):
        return _error(exc.status, [{"field": exc.field, "message": exc.message}])
    if isinstance(exc, QueueFull):
        return _busy(str(exc))
    return _late(exc)


def _json_body(headers: dict) -> bool:
    """Whether the request says its body is JSON in the usual way (Content-Type: application/json, any
    parameters); FastAPI takes more (any application/*+json), which the fast path leaves to it."""
    ct = headers.get(b"content-type")
    return ct is not None and ct.split(b";", 1)[0].strip().lower() == b"application/json"


def _replay(body: bytes, receive):
    """A receive callable that gives ``body`` (already read) first, then whatever ``receive`` gives."""
    given = False

    async def again():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


class _BodyTooLarge(StarletteHTTPException):
    # an HTTPException, so that FastAPI's body reading passes it on to the handler unchanged
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class ServiceMiddleware:
    """Pure ASGI middleware: request metrics (count, latency by endpoint), the request body size limit
    (413, from Content-Length before reading, or while a body without one streams in), a 429 for
    a recommend request while the batcher's queue is full (before its body is read or parsed: under
    overload a refusal must cost far less than an answer), and the fast paths.

    fast: {path: handler} of POST endpoints answered here rather than by FastAPI's routing (whose
    dependency solving, request objects and exception handlers cost more than the rest of a lone
    request's HTTP path): the body is read, and ``await handler(body)`` gives the response, or None
    when the request is not one it answers (a bad body: the route then gets the body as read and
    answers it, with its error message). fast_counts: how many requests to those paths went each way
    ("fast", "routed")."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, queue_full=None, fast=None):
        self.app, self.metrics, self.max_body, self.queue_full = app, metrics, max_body_bytes, queue_full
        self.fast = fast or {}
        self.fast_counts = {"fast": 0, "routed": 0}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = endpoint_label(scope["path"])
        status = 500
        started = False
        m = self.metrics
        m.inflight.inc()

        async def send_wrapper(msg):
            nonlocal status, started
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
            await send(msg)

        async def reject(code: int, message: str):
            await _error(code, [{"field": "body", "message": message}])(scope, receive, send_wrapper)

        try:
            why = self.queue_full() if endpoint == "/v1/recommend" and self.queue_full is not None else None
            if why is not None:
                return await _busy(why)(scope, receive, send_wrapper)
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                if length.isdigit():
                    return await reject(413, f"request body of {int(length)} bytes exceeds the limit of "
                                             f"{self.max_body} bytes")
                return await reject(400, f"invalid Content-Length {length.decode(errors='replace')!r}")
            seen = 0

            async def limited_receive():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return msg

            inner = limited_receive
            fast = self.fast.get(endpoint) if scope["method"] == "POST" else None
            if fast is not None and _json_body(headers):
                chunks = []
                while True:
                    try:
                        msg = await limited_receive()
                    except _BodyTooLarge as exc:
                        return await reject(413, exc.detail)
                    chunks.append(msg.get("body", b""))
                    if msg["type"] != "http.request" or not msg.get("more_body", False):
                        break  # the whole body, or the client went away (the route answers what came)
                body = b"".join(chunks)
                response = await fast(body)
                if response is not None:
                    self.fast_counts["fast"] += 1
                    return await response(scope, receive, send_wrapper)
                inner = _replay(body, receive)
            if fast is not None:
                self.fast_counts["routed"] += 1
            try:
                await self.app(scope, inner, send_wrapper)
            except _BodyTooLarge as exc:
                if not started:
                    await reject(413, exc.detail)
        finally:
            m.inflight.dec()
            m.requests.labels(endpoint, scope["method"], str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


class ServiceApp(FastAPI):
    """The FastAPI app with :class:`ServiceMiddleware` outside FastAPI's own layers (its telemetry, body
    limit and error pages, each a call per request): metrics, limits, refusals and the fast paths come
    first, and everything else goes on to FastAPI as usual. ``service`` is set by :func:`create_app`."""

    service: Optional[ServiceMiddleware] = None

    async def __call__(self, scope, receive, send):
        if self.service is None:
            return await super().__call__(scope, receive, send)
        await self.service(scope, receive, send)


def preload_text(rec: Recommender) -> None:
    """Loads (and warms up) the text encoder of a model with "lm" item text, so that the first add is fast;
    logs, and carries on, when it is unavailable (adds then answer 503 saying what to install)."""
    if rec.config.text != "lm":
        return
    try:
        from ..data import text as T
        encoder = T.load_text_encoder(rec.config.text_model)
    except Exception as exc:  # noqa: BLE001 - serving goes on without adds
        log.warning("unirec: item text encoder %s unavailable, POST /v1/items will answer 503: %s",
                    rec.config.text_model, exc)
        return
    try:  # the encoder's first call costs several of the next ones
        encoder.encode(["warm up"], show_progress_bar=False)
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def _run_jobs(pairs):
    """The batch function: (recommender, job) pairs, each group run on its own recommender (a batch
    taken during a reload holds jobs for both the old and the new model)."""
    out: list = [None] * len(pairs)
    groups: dict = {}
    for j, (rec, _) in enumerate(pairs):
        groups.setdefault(id(rec), (rec, []))[1].append(j)
    for rec, idx in groups.values():
        for j, res in zip(idx, rec.run_batch([pairs[j][1] for j in idx])):
            out[j] = res
    return out


# --------------------------------------------------------------------------- the app


def create_app(run_dir: Union[str, Path], state_dir: Union[str, Path, None] = None, *, max_batch: int = 64,
               max_wait_ms: float = 0.0, cache_size: int = 10000, api_key: Optional[str] = None,
               max_body_bytes: int = 256 * 1024, impl: str = "auto", max_queue: int = 256,
               max_latency_ms: Optional[float] = 50.0, timeout_ms: float = 1000.0,
               dismiss_demotion: float = DEFAULT_DISMISS_DEMOTION,
               reload_signal: bool = False, inline: bool = True) -> FastAPI:
    """The service over run folder ``run_dir``; its SQLite store is ``state_dir/events.sqlite3``
    (state_dir defaults to ``run_dir/serving``).

    max_batch / max_wait_ms: the micro-batcher (1 = every request alone; see
    :class:`~unirec.serving.batcher.MicroBatcher`); max_queue: recommend requests waiting at most;
    max_latency_ms: a new one gets 429 when it (or the first of its batch) would be answered later
    than this after it came (None: no bound; see the batcher);
    timeout_ms: a recommend request's deadline, 503 past it; cache_size: user states
    cached (0 = none); api_key: when set, required in the X-API-Key header of writes, of history
    reads and of reloads (which are refused without one); max_body_bytes: larger request bodies get
    413; impl: kernel backend of the model; dismiss_demotion: how far items close to a dismissed one
    fall (see :class:`~unirec.serving.engine.Recommender`); reload_signal: reload on SIGHUP (needs
    the main thread's event loop, as under ``unirec serve``); inline: a lone recommend request runs
    its model call in the event loop's thread, without the hand-offs to the model thread and back
    (see :class:`~unirec.serving.batcher.MicroBatcher`).
    """
    run_dir = Path(run_dir)
    state_dir = Path(state_dir) if state_dir is not None else run_dir / "serving"
    model, split, version = load_run(run_dir, impl=impl)
    metrics = Metrics()
    store = EventStore(state_dir / "events.sqlite3")

    def build(model, split, version) -> Recommender:
        return Recommender(model, split, store, version, cache_size=cache_size, metrics=metrics,
                           dismiss_demotion=dismiss_demotion, text_home=state_dir)

    live = {"rec": build(model, split, version)}  # the serving recommender; a reload replaces it
    preload_text(live["rec"])
    live["rec"].restore_items()
    batcher = MicroBatcher(_run_jobs, max_batch=max_batch, max_wait_ms=max_wait_ms, on_batch=metrics.observe_batch,
                           max_queue=max_queue, max_latency_ms=max_latency_ms, timeout_ms=timeout_ms,
                           inline=inline)
    # One writer thread: commits are serialised anyway, and the event loop never waits on an fsync.
    writer = ThreadPoolExecutor(1, thread_name_prefix="unirec-writer")
    # Adds: one at a time, in their own thread (an add embeds text and commits); items_lock also covers a
    # reload's restore-and-swap, so that no add falls between the two.
    adder = ThreadPoolExecutor(1, thread_name_prefix="unirec-items")
    items_lock = threading.Lock()
    reload_lock = asyncio.Lock()

    def current() -> Recommender:
        return live["rec"]

    async def reload(path: Optional[str] = None) -> dict:
        """Loads ``path`` (default: run_dir again) beside the serving model, then swaps it in."""
        if reload_lock.locked():
            raise ApiError(409, "run_dir", "a reload is already running")
        async with reload_lock:
            target = run_dir if path is None else Path(path)
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(None, lambda: build(*load_run(target, impl=impl)))
            except Exception as exc:  # noqa: BLE001 - whatever broke, the serving model stays
                raise ApiError(422, "run_dir", f"cannot load {target}: {exc}") from None

            def restore_and_swap() -> Recommender:
                preload_text(new)
                with items_lock:
                    new.restore_items()
                    old, live["rec"] = live["rec"], new
                return old

            old = await loop.run_in_executor(None, restore_and_swap)
            metrics.reloads.inc()
            return {"model_version": new.version, "previous_version": old.version,
                    "seconds": time.perf_counter() - t0}

    async def reload_on_signal():
        try:
            r = await reload()
            log.warning("unirec: reloaded %s (was %s) in %.1f s", r["model_version"], r["previous_version"],
                        r["seconds"])
        except ApiError as exc:
            log.error("unirec: reload failed: %s", exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loop = asyncio.get_running_loop()
        if reload_signal:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_on_signal()))
        try:
            yield
        finally:
            if reload_signal:
                loop.remove_signal_handler(signal.SIGHUP)
            await batcher.stop()
            adder.shutdown(wait=True)
            writer.shutdown(wait=True)
            store.close()

    app = ServiceApp(title="unirec", version="1", lifespan=lifespan,
                     description="Recommendations from a unirec run, with live user events. "
                                 "Ids are the data set's own.")
    app.state.store, app.state.metrics, app.state.batcher = store, metrics, batcher
    app.state.current, app.state.reload = current, reload

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = [{"field": "body" if e.get("type") == "json_invalid" else _field(e.get("loc", ())),
                 "message": _message(e, request)} for e in exc.errors()]
        return _error(422, errs)

    @app.exception_handler(ApiError)
    @app.exception_handler(QueueFull)
    @app.exception_handler(DeadlineExceeded)
    async def _refused(request: Request, exc: Exception):
        return _refusal(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, _BodyTooLarge):
            return _error(413, [{"field": "body", "message": exc.detail}])
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)

    def require_key(x_api_key: Annotated[Optional[str], Header(description="API key, when the server has one")] = None):
        if api_key is None:
            return
        if x_api_key is None:
            raise ApiError(401, API_KEY_HEADER, "missing; this endpoint needs the API key in this header")
        if not secrets.compare_digest(x_api_key.encode(), api_key.encode()):
            raise ApiError(401, API_KEY_HEADER, "wrong API key")

    def require_admin(x_api_key: Annotated[Optional[str], Header(description="API key")] = None):
        if api_key is None:
            raise ApiError(403, API_KEY_HEADER, "admin endpoints are off: start the server with --api-key "
                                                "(or reload with SIGHUP)")
        require_key(x_api_key)

    def added(rec: Recommender, i: int, out: dict) -> dict:
        if i > rec.trained_items:
            out["added"] = True
        return out

    def items_out(rec: Recommender, items, scores) -> List[dict]:
        return [added(rec, i, {"item_id": rec.item_ids[i], "score": s if math.isfinite(s) else None,
                               "title": rec.title(i)}) for i, s in zip(items, scores)]

    async def recommend_answer(req: RecommendRequest) -> dict:
        """The answer to a valid recommend request (raises ApiError, QueueFull, DeadlineExceeded)."""
        rec = current()  # this request's model, to the end, whatever a reload does meanwhile
        hist = None if req.history is None else [rec.item_index(v, f"history[{j}]") for j, v in enumerate(req.history)]
        cands = None
        if req.candidates is not None:
            c = [rec.item_index(v, f"candidates[{j}]") for j, v in enumerate(req.candidates)]
            cands = np.asarray(list(dict.fromkeys(c)), dtype=np.int64)
        job = RecommendJob(k=req.k, exclude_seen=req.exclude_seen, user_id=req.user_id, history=hist, candidates=cands)
        res = await batcher.submit((rec, job))
        return {"model_version": rec.version, "user_id": req.user_id, "known_user": res.known_user,
                "source": res.source, "history_length": res.history_length,
                "items": items_out(rec, res.items, res.scores)}

    async def recommend_fast(body: bytes) -> Optional[Response]:
        """POST /v1/recommend without FastAPI's routing (see ServiceMiddleware): the body parsed and
        validated as the route does (json.loads, then RecommendRequest), the same answer and refusals;
        None for a body that is not a valid request, which the route then answers with its message."""
        try:
            req = RecommendRequest.model_validate(json.loads(body))
        except Exception:  # noqa: BLE001 - not a valid request: the route names what is wrong
            return None
        try:
            return JSONResponse(await recommend_answer(req))
        except (ApiError, QueueFull, DeadlineExceeded) as exc:
            return _refusal(exc)

    @app.post("/v1/recommend", response_model=RecommendResponse, tags=["recommend"],
              responses={422: {"description": "a field is invalid (named in detail)"},
                         429: {"description": "the request queue is full (Retry-After)"},
                         503: {"description": "not answered within the deadline (Retry-After)"}})
    async def recommend(req: RecommendRequest):
        """Top-k items for a user (data-set + live events) or for a given history."""
        return JSONResponse(await recommend_answer(req))

    @app.post("/v1/events", status_code=201, response_model=EventResponse, tags=["events"],
              dependencies=[Depends(require_key)],
              responses={401: {"description": "API key missing or wrong"}, 422: {"description": "a field is invalid"}})
    async def post_event(ev: EventRequest):
        """Appends an event to the user's live history; answered once it is on disk. The user's next
        recommendation reflects it."""
        rec = current()
        rec.item_index(ev.item_id, "item_id")
        cfg = rec.schema
        if ev.rating is not None:
            if ev.kind != "view":
                raise ApiError(422, "rating", f"only an event of kind 'view' takes a rating (this one is {ev.kind!r})")
            if not cfg.rating_min <= ev.rating <= cfg.rating_max:
                raise ApiError(422, "rating",
                               f"must be between {cfg.rating_min:g} and {cfg.rating_max:g}, got {ev.rating:g}")
        loop = asyncio.get_running_loop()
        e = await loop.run_in_executor(writer, lambda: store.append(ev.user_id, ev.item_id, ev.timestamp, ev.rating,
                                                                    ev.kind))
        current().invalidate(ev.user_id)  # the model serving now (a reload may have happened meanwhile)
        metrics.events.labels(ev.kind).inc()
        return JSONResponse({"event_id": e.id, "user_id": e.user_id, "item_id": e.item_id, "kind": e.kind,
                             "timestamp": e.timestamp, "rating": e.rating}, status_code=201)

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, tags=["items"])
    async def similar(item_id: str, k: Annotated[int, Query(ge=1, le=MAX_K, description="how many items")] = 10):
        """The k items closest to ``item_id`` (cosine of the model's item representations)."""
        rec = current()
        i = rec.item_index(item_id, "item_id", status=404)
        items, scores = await asyncio.get_running_loop().run_in_executor(None, rec.similar, i, k)
        return JSONResponse({"model_version": rec.version, "item_id": item_id, "title": rec.title(i),
                             "items": items_out(rec, items, scores)})

    @app.get("/v1/items", response_model=SearchResponse, tags=["items"])
    async def search(q: Annotated[str, Query(min_length=1, max_length=200, description="text in the title, or an id")],
                     k: Annotated[int, Query(ge=1, le=100, description="how many items")] = 20):
        """Items whose title contains ``q`` (case-insensitive) or whose id is ``q``, most popular first."""
        rec = current()
        hits = await asyncio.get_running_loop().run_in_executor(None, rec.search, q, k)
        return JSONResponse({"items": [added(rec, i, {"item_id": rec.item_ids[i], "title": rec.title(i),
                                                      "popularity": float(rec.popularity[i])}) for i in hits]})

    @app.post("/v1/items", status_code=201, response_model=AddItemResponse, tags=["items"],
              dependencies=[Depends(require_key)],
              responses={401: {"description": "API key missing or wrong"},
                         409: {"description": "the item id is in the catalogue or was added already"},
                         422: {"description": "a field is invalid (named in detail), or the model cannot "
                                              "represent new items (detail: model: why)"},
                         503: {"description": "the model's item text features are not installed"}})
    async def add_item(req: AddItemRequest):
        """Adds an item nobody has rated yet, from its title and attribute values: the model represents it
        as it represents its catalogue (from its text and attributes, without an id row), and it is
        recommendable, similar to others and searchable at once. Answered once it is stored: it is added
        again after a restart or a reload."""
        t0 = time.perf_counter()

        def add():
            with items_lock:
                rec = current()
                return rec, rec.add_item(req.item_id, req.fields)

        rec, res = await asyncio.get_running_loop().run_in_executor(adder, add)
        return JSONResponse({"model_version": rec.version, **res, "seconds": time.perf_counter() - t0},
                            status_code=201)

    @app.get("/v1/users/{user_id}/history", response_model=HistoryResponse, tags=["users"],
             dependencies=[Depends(require_key)], responses={401: {"description": "API key missing or wrong"}})
    async def history(user_id: str):
        """The user's events, oldest first: the data set's, then the live ones."""
        rec = current()
        u = rec.user_index(user_id)
        live = await asyncio.get_running_loop().run_in_executor(None, store.events, user_id)
        events = []
        if u:
            sp = rec.split
            s, e = int(sp.user_offsets[u]), int(sp.user_offsets[u + 1])
            for p in range(s, e):
                r = None if sp.ratings is None else float(sp.ratings[p])
                events.append({"item_id": rec.item_ids[int(sp.items[p])], "title": rec.title(int(sp.items[p])),
                               "timestamp": float(sp.timestamps[p]), "rating": r, "kind": "view",
                               "source": "dataset"})
        for ev in live:
            i = rec.item_of(ev.item_id)
            events.append({"item_id": ev.item_id, "title": rec.title(i) if i else None, "timestamp": ev.timestamp,
                           "rating": ev.rating, "kind": ev.kind, "source": "live"})
        return JSONResponse({"user_id": user_id, "known_user": bool(u), "events": events})

    @app.post("/v1/admin/reload", response_model=ReloadResponse, tags=["service"],
              dependencies=[Depends(require_admin)],
              responses={401: {"description": "API key missing or wrong"},
                         403: {"description": "the server has no API key"},
                         409: {"description": "a reload is already running"},
                         422: {"description": "the run folder cannot be loaded"}})
    async def admin_reload(req: Annotated[Optional[ReloadRequest], Body()] = None):
        """Loads a run folder (default: the server's, read again) and swaps it in without dropping
        requests: those in flight finish on the old model, later ones use the new."""
        return JSONResponse(await reload(None if req is None else req.run_dir))

    @app.get("/healthz", tags=["service"])
    async def healthz():
        """Liveness and what is loaded (with a few user ids to try)."""
        rec = current()
        users = rec.split.dataset.user_vocab
        return {"status": "ok", "model_version": rec.version, "items": rec.num_items, "users": len(users) - 1,
                "example_users": [str(u) for u in users[1:6]], "titles": rec.titles is not None,
                "added_items": rec.added_items, "item_fields": rec.item_fields(),
                "can_add_items": rec.new_item_problem() is None, "queued": batcher.queued}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus():
        """Prometheus text: requests by endpoint and status, latency and batch size histograms."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.service = ServiceMiddleware(functools.partial(FastAPI.__call__, app), metrics=metrics,
                                    max_body_bytes=max_body_bytes, queue_full=batcher.full,
                                    fast={"/v1/recommend": recommend_fast})
    app.state.fast_counts = app.service.fast_counts
    return app


def serve(run_dir: Union[str, Path], host: str = "127.0.0.1", port: int = 8000, *, threads: int = 1,
          log_level: str = "warning", access_log: bool = False, **app_kwargs) -> None:
    """Runs :func:`create_app` under uvicorn until interrupted (keyword arguments go to create_app);
    SIGHUP reloads the run folder.

    threads: torch intra-op threads of the model. One by default: on 2 cores the event loop (and any
    client on the same machine) needs the other core, and a second intra-op thread cost more latency
    than it saved (MovieLens-100K at 1000 requests/s: p99 26-28 ms on one thread, 36-99 ms on two).
    """
    import torch
    import uvicorn
    # oneDNN (GELU's kernel, here) compiles a kernel per tensor shape and keeps it; batches come in ever new
    # shapes (their total token count), so each batch paid a compile (GELU 3x slower: a batch of 4-24 users
    # 8.4 against 7.6 ms with 16 kernels kept) or, with oneDNN's 1024 kept, the server grew by ~200-270 MB in
    # a minute of overload. ATen's own kernels (the matmuls are MKL's either way) have neither cost.
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(threads)
    app = create_app(run_dir, reload_signal=True, **app_kwargs)
    # The model, the data set and the libraries are long-lived: keep the collector from rescanning them
    # (a full collection over them takes tens of milliseconds, a latency spike for every request in flight).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)

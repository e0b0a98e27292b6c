"""The HTTP service: a FastAPI app over a run folder (see :func:`create_app`; ``unirec serve`` runs it).

Endpoints (JSON; ids are the data set's own, as strings):

- ``POST /v1/recommend`` {user_id | history, k, exclude_seen, candidates} -> ranked items with titles
- ``POST /v1/events`` {user_id, item_id, timestamp?, rating?} -> 201 once the event is durable
- ``GET /v1/items/{item_id}/similar?k=``, ``GET /v1/users/{user_id}/history``
- ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``, ``GET /docs``

Every client error is a 4xx whose ``detail`` names the field ("k: Input should be less than or
equal to 1000"), with the list of ``errors`` ({field, message}) for validation errors.
"""
from __future__ import annotations

import asyncio
import gc
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, List, Optional, Union

import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StringConstraints
from pydantic import model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import MicroBatcher
from .engine import ApiError, Recommender, RecommendJob, load_run
from .metrics import Metrics, endpoint_label
from .store import EventStore

API_KEY_HEADER = "X-API-Key"
MAX_K = 1000
MAX_LIST = 10000


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
    exclude_seen: StrictBool = Field(True, description="leave out items already in the history")
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
    timestamp: Optional[Annotated[float, Field(allow_inf_nan=False, ge=0)]] = Field(
        None, description="seconds since the epoch (default: when it is received)")
    rating: Optional[Annotated[float, Field(allow_inf_nan=False)]] = None


class EventResponse(BaseModel):
    event_id: int
    user_id: str
    item_id: str
    timestamp: float
    rating: Optional[float] = None


class HistoryEvent(BaseModel):
    item_id: str
    title: Optional[str] = None
    timestamp: Optional[float] = None
    rating: Optional[float] = None
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


class _BodyTooLarge(StarletteHTTPException):
    # an HTTPException, so that FastAPI's body reading passes it on to the handler unchanged
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class ServiceMiddleware:
    """Pure ASGI middleware: request metrics (count, latency by endpoint) and the request body size limit
    (413, from Content-Length before reading, or while a body without one streams in)."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

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
            length = dict(scope["headers"]).get(b"content-length")
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

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _BodyTooLarge as exc:
                if not started:
                    await reject(413, exc.detail)
        finally:
            m.inflight.dec()
            m.requests.labels(endpoint, scope["method"], str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


# --------------------------------------------------------------------------- the app


def create_app(run_dir: Union[str, Path], state_dir: Union[str, Path, None] = None, *, max_batch: int = 64,
               max_wait_ms: float = 2.0, cache_size: int = 10000, api_key: Optional[str] = None,
               max_body_bytes: int = 256 * 1024, impl: str = "auto") -> FastAPI:
    """The service over run folder ``run_dir``; its SQLite store is ``state_dir/events.sqlite3``
    (state_dir defaults to ``run_dir/serving``).

    max_batch / max_wait_ms: the micro-batcher (1 = every request alone); cache_size: user states
    cached (0 = none); api_key: required in the X-API-Key header of writes when set;
    max_body_bytes: larger request bodies get 413; impl: kernel backend of the model.
    """
    run_dir = Path(run_dir)
    state_dir = Path(state_dir) if state_dir is not None else run_dir / "serving"
    model, split, version = load_run(run_dir, impl=impl)
    metrics = Metrics()
    store = EventStore(state_dir / "events.sqlite3")
    rec = Recommender(model, split, store, version, cache_size=cache_size, metrics=metrics)
    batcher = MicroBatcher(rec.run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           on_batch=metrics.observe_batch)
    # One writer thread: commits are serialised anyway, and the event loop never waits on an fsync.
    writer = ThreadPoolExecutor(1, thread_name_prefix="unirec-writer")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            writer.shutdown(wait=True)
            store.close()

    app = FastAPI(title="unirec", version="1", lifespan=lifespan,
                  description="Recommendations from a unirec run, with live user events. Ids are the data set's own.")
    app.state.recommender, app.state.store, app.state.metrics = rec, store, metrics
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = [{"field": "body" if e.get("type") == "json_invalid" else _field(e.get("loc", ())),
                 "message": _message(e, request)} for e in exc.errors()]
        return _error(422, errs)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, [{"field": exc.field, "message": exc.message}])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, _BodyTooLarge):
            return _error(413, [{"field": "body", "message": exc.detail}])
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)

    def require_key(x_api_key: Annotated[Optional[str], Header(description="API key, when the server has one")] = None):
        if api_key is None:
            return
        if x_api_key is None:
            raise ApiError(401, API_KEY_HEADER, "missing; writes need the API key in this header")
        if not secrets.compare_digest(x_api_key.encode(), api_key.encode()):
            raise ApiError(401, API_KEY_HEADER, "wrong API key")

    def items_out(items, scores) -> List[dict]:
        return [{"item_id": rec.item_ids[i], "score": s if math.isfinite(s) else None, "title": rec.title(i)}
                for i, s in zip(items, scores)]

    @app.post("/v1/recommend", response_model=RecommendResponse, tags=["recommend"],
              responses={422: {"description": "a field is invalid (named in detail)"}})
    async def recommend(req: RecommendRequest):
        """Top-k items for a user (data-set + live events) or for a given history."""
        hist = None if req.history is None else [rec.item_index(v, f"history[{j}]") for j, v in enumerate(req.history)]
        cands = None
        if req.candidates is not None:
            c = [rec.item_index(v, f"candidates[{j}]") for j, v in enumerate(req.candidates)]
            cands = np.asarray(list(dict.fromkeys(c)), dtype=np.int64)
        job = RecommendJob(k=req.k, exclude_seen=req.exclude_seen, user_id=req.user_id, history=hist, candidates=cands)
        res = await batcher.submit(job)
        return JSONResponse({"model_version": rec.version, "user_id": req.user_id, "known_user": res.known_user,
                             "source": res.source, "history_length": res.history_length,
                             "items": items_out(res.items, res.scores)})

    @app.post("/v1/events", status_code=201, response_model=EventResponse, tags=["events"],
              dependencies=[Depends(require_key)],
              responses={401: {"description": "API key missing or wrong"}, 422: {"description": "a field is invalid"}})
    async def post_event(ev: EventRequest):
        """Appends an event to the user's live history; answered once it is on disk. The user's next
        recommendation reflects it."""
        rec.item_index(ev.item_id, "item_id")
        cfg = rec.model.schema
        if ev.rating is not None and not cfg.rating_min <= ev.rating <= cfg.rating_max:
            raise ApiError(422, "rating", f"must be between {cfg.rating_min:g} and {cfg.rating_max:g}, got {ev.rating:g}")
        loop = asyncio.get_running_loop()
        e = await loop.run_in_executor(writer, store.append, ev.user_id, ev.item_id, ev.timestamp, ev.rating)
        rec.invalidate(ev.user_id)
        metrics.events.inc()
        return JSONResponse({"event_id": e.id, "user_id": e.user_id, "item_id": e.item_id, "timestamp": e.timestamp,
                             "rating": e.rating}, status_code=201)

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, tags=["items"])
    async def similar(item_id: str, k: Annotated[int, Query(ge=1, le=MAX_K, description="how many items")] = 10):
        """The k items closest to ``item_id`` (cosine of the model's item representations)."""
        i = rec.item_index(item_id, "item_id", status=404)
        items, scores = await asyncio.get_running_loop().run_in_executor(None, rec.similar, i, k)
        return JSONResponse({"model_version": rec.version, "item_id": item_id, "title": rec.title(i),
                             "items": items_out(items, scores)})

    @app.get("/v1/users/{user_id}/history", response_model=HistoryResponse, tags=["users"])
    async def history(user_id: str):
        """The user's events, oldest first: the data set's, then the live ones."""
        u = rec.user_index(user_id)
        live = await asyncio.get_running_loop().run_in_executor(None, store.events, user_id)
        events = []
        if u:
            sp = rec.split
            s, e = int(sp.user_offsets[u]), int(sp.user_offsets[u + 1])
            for p in range(s, e):
                r = None if sp.ratings is None else float(sp.ratings[p])
                events.append({"item_id": rec.item_ids[int(sp.items[p])], "title": rec.title(int(sp.items[p])),
                               "timestamp": float(sp.timestamps[p]), "rating": r, "source": "dataset"})
        for ev in live:
            i = rec._item_index.get(ev.item_id)
            events.append({"item_id": ev.item_id, "title": rec.title(i) if i else None, "timestamp": ev.timestamp,
                           "rating": ev.rating, "source": "live"})
        return JSONResponse({"user_id": user_id, "known_user": bool(u), "events": events})

    @app.get("/healthz", tags=["service"])
    async def healthz():
        """Liveness and what is loaded."""
        return {"status": "ok", "model_version": rec.version, "items": rec.num_items,
                "users": len(rec.split.dataset.user_vocab) - 1}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus():
        """Prometheus text: requests by endpoint and status, latency and batch size histograms."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(run_dir: Union[str, Path], host: str = "127.0.0.1", port: int = 8000, *, threads: int = 1,
          log_level: str = "warning", access_log: bool = False, **app_kwargs) -> None:
    """Runs :func:`create_app` under uvicorn until interrupted (keyword arguments go to create_app).

    threads: torch intra-op threads of the model. One by default: on 2 cores the event loop (and any
    client on the same machine) needs the other core, and a second intra-op thread cost more latency
    than it saved (MovieLens-100K at 1000 requests/s: p99 26-28 ms on one thread, 36-99 ms on two).
    """
    import torch
    import uvicorn
    torch.set_num_threads(threads)
    app = create_app(run_dir, **app_kwargs)
    # The model, the data set and the libraries are long-lived: keep the collector from rescanning them
    # (a full collection over them takes tens of milliseconds, a latency spike for every request in flight).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)

"""Prometheus metrics of the service (one registry per app, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# The endpoints as routed, so that labels stay few whatever paths clients send.
ENDPOINTS = ("/v1/recommend", "/v1/events", "/v1/items", "/v1/admin/reload", "/healthz", "/metrics", "/docs",
             "/openapi.json", "/")


def endpoint_label(path: str) -> str:
    """The route template of ``path`` (ids replaced by their parameter name), or "other"."""
    if path in ENDPOINTS:
        return path
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v1", "items"] and parts[4] == "similar":
        return "/v1/items/{item_id}/similar"
    if len(parts) == 5 and parts[:3] == ["", "v1", "users"] and parts[4] == "history":
        return "/v1/users/{user_id}/history"
    if path.startswith("/static/"):
        return "/static"
    return "other"


class Metrics:
    """Request counts and latencies per endpoint, batch sizes and forward-pass times, cache and events."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("unirec_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("unirec_request_latency_seconds", "HTTP request latency (server side)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("unirec_batch_size", "recommend requests per model batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("unirec_batch_seconds", "time of one model batch (forward + ranking)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("unirec_user_state_cache", "user state cache look-ups", ["result"], registry=r)
        self.events = Counter("unirec_events_stored", "events stored by kind", ["kind"], registry=r)
        self.reloads = Counter("unirec_model_reloads", "models swapped in after the first", registry=r)
        self.inflight = Gauge("unirec_requests_in_flight", "HTTP requests being served", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

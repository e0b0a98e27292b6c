"""Real-time serving: an HTTP recommendation service over a run folder, with live user events.

``unirec serve RUN`` runs :func:`serve`; :func:`create_app` builds the FastAPI app (for tests or
another ASGI server). See :mod:`unirec.serving.app` for the endpoints.
"""
from .app import create_app, serve
from .batcher import DeadlineExceeded, MicroBatcher, QueueFull
from .engine import ApiError, Ranked, RecommendJob, Recommender, load_run
from .store import KINDS, Event, EventStore

__all__ = ["create_app", "serve", "MicroBatcher", "QueueFull", "DeadlineExceeded", "ApiError", "Ranked",
           "RecommendJob", "Recommender", "load_run", "KINDS", "Event", "EventStore"]

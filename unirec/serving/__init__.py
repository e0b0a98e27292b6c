"""Real-time serving: an HTTP recommendation service over a run folder, with live user events.

``unirec serve RUN`` runs :func:`serve`; :func:`create_app` builds the FastAPI app (for tests or
another ASGI server). See :mod:`unirec.serving.app` for the endpoints.
"""
from .app import create_app, serve
from .batcher import MicroBatcher
from .engine import ApiError, Ranked, RecommendJob, Recommender, load_run
from .store import Event, EventStore

__all__ = ["create_app", "serve", "MicroBatcher", "ApiError", "Ranked", "RecommendJob", "Recommender", "load_run",
           "Event", "EventStore"]

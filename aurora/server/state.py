"""Per-app state shared by the handlers: typed app keys and admission control.

Admission: at most `max_concurrent` generation requests are served at once; the next
one gets 429 with Retry-After (no hidden HTTP-level queue; the engine itself already
queues what it admitted). While draining for shutdown, new generations get 503, and
`active` names the in-flight request ids so shutdown can abort them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from aiohttp import web

from aurora.config import ServerConfig
from aurora.server.errors import APIError
from aurora.server.metrics import ServerMetrics


@dataclass
class ServerState:
    model_ids: tuple[str, ...]
    metrics: ServerMetrics
    max_concurrent: int
    created: int = field(default_factory=lambda: int(time.time()))
    active: set = field(default_factory=set)     # request ids being generated
    draining: bool = False

    @property
    def in_flight(self) -> int:
        return len(self.active)

    @contextlib.contextmanager
    def admit(self, request_id: str):
        """Hold one generation slot, or refuse the request."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.in_flight >= self.max_concurrent:
            raise APIError(429, f"too many concurrent requests (limit {self.max_concurrent}); retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.active.add(request_id)
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.active.discard(request_id)
            self.metrics.in_flight.dec()


ENGINE = web.AppKey("engine", object)
CONFIG = web.AppKey("server_config", ServerConfig)
STATE = web.AppKey("server_state", ServerState)

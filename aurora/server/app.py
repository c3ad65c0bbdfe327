"""The aiohttp application: `create_app(engine, server_config)`.

Middlewares, outermost first: metrics (count, time and access-log every request), errors (every
failure becomes an OpenAI-style JSON body; unexpected exceptions become a logged 500),
auth (Bearer key, constant-time compare; /health stays open for probes).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web

from aurora.config import ServerConfig
from aurora.server import admin, generate
from aurora.server.access_log import log_request
from aurora.server.errors import APIError, error_response
from aurora.server.metrics import ServerMetrics
from aurora.server.state import CONFIG, ENGINE, STATE, ServerState

log = logging.getLogger("aurora.server")
OPEN_PATHS = ("/health",)
MODEL_ALIAS = "aurora"


def create_app(engine, server_config: ServerConfig | None = None) -> web.Application:
    config = server_config or ServerConfig()
    model = engine.config.model
    model_ids = (model, MODEL_ALIAS) if model != MODEL_ALIAS else (model,)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[metrics_middleware, error_middleware, auth_middleware])
    app[ENGINE] = engine
    app[CONFIG] = config
    app[STATE] = ServerState(model_ids, ServerMetrics(engine), config.max_concurrent)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    generate.add_routes(app)
    admin.add_routes(app)
    return app


# ---------------------------------------------------------------- middlewares
@web.middleware
async def metrics_middleware(request: web.Request, handler):
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status: int | str = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except asyncio.CancelledError:
        status = 499                                 # client closed the connection (nginx's code)
        raise
    finally:
        seconds = time.perf_counter() - start
        request.app[STATE].metrics.observe_request(route, request.method, status, seconds)
        log_request(request, status, seconds)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:                 # aiohttp's own: 404, 405, 413 ...
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"request body is too large (limit {request.app[CONFIG].max_body_bytes} bytes)"
        return error_response(exc.status, message, headers=_allow_header(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")


def _allow_header(exc: web.HTTPException) -> dict | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


@web.middleware
async def auth_middleware(request: web.Request, handler):
    key = request.app[CONFIG].api_key
    if key and request.path not in OPEN_PATHS:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


# ---------------------------------------------------------------- small routes
async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    stats = request.app[ENGINE].stats()
    return web.json_response({"status": "ok", "model": state.model_ids[0], "draft": stats.get("draft"),
                              "running": stats.get("running"), "waiting": stats.get("waiting"),
                              "in_flight": state.in_flight})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _model_card(state: ServerState, model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": state.created, "owned_by": "aurora"}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [_model_card(state, state.model_ids[0])]})


async def get_model(request: web.Request) -> web.Response:
    state, name = request.app[STATE], request.match_info["model"]
    if name not in state.model_ids:
        raise APIError(404, f"the model '{name[:200]}' does not exist", "model", "model_not_found")
    return web.json_response(_model_card(state, state.model_ids[0]))

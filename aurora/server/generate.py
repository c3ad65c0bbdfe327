"""`POST /v1/completions` and `POST /v1/chat/completions`: drive `engine.generate`.

The engine's async generator is always closed (`aclosing`), so a client that
disconnects, a cancelled handler or a failed write aborts the request in the engine
and frees its KV blocks at once. Streamed text holds back the last `len(stop) - 1`
characters until they cannot start a stop string, so clients never see stop text.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from aurora.server import openai_api as oa
from aurora.server.access_log import GENERATION, log_prefill_start
from aurora.server.errors import APIError, bad_request, error_body
from aurora.server.metrics import ServerMetrics
from aurora.server.state import CONFIG, ENGINE, STATE
from aurora.types import RequestOutput

log = logging.getLogger("aurora.server")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Progress:
    """Per-request text cursor (with stop-string hold-back) and token timing."""

    def __init__(self, req: oa.GenerationRequest, metrics: ServerMetrics):
        self.metrics = metrics
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1
        self.num_sent_chars = 0
        self.num_tokens = 0
        self.start = time.perf_counter()
        self.first = self.last = None
        self.output: RequestOutput | None = None    # the latest output (for the access log)

    def update(self, out: RequestOutput) -> str:
        """Record `out`; return the text that is now safe to send."""
        self.output = out
        if len(out.token_ids) > self.num_tokens:
            self.last = time.perf_counter()
            if self.first is None:
                self.first = self.last
                self.metrics.ttft.observe(self.first - self.start)
            self.num_tokens = len(out.token_ids)
        end = len(out.text) if out.finished else len(out.text) - self.hold
        if end <= self.num_sent_chars:
            return ""
        piece, self.num_sent_chars = out.text[self.num_sent_chars:end], end
        return piece

    def finish(self) -> None:
        if self.num_tokens > 1:
            self.metrics.itl.observe((self.last - self.first) / (self.num_tokens - 1))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine, state, config = request.app[ENGINE], request.app[STATE], request.app[CONFIG]
    body = oa.parse_body(await request.read())
    req = oa.parse_request(body, engine, chat=chat, model_ids=state.model_ids,
                           max_prompt_chars=config.max_prompt_chars)
    with state.admit(req.request_id):
        progress = request[GENERATION] = _Progress(req, state.metrics)
        log_prefill_start(req.request_id, len(req.prompt_ids))
        async with contextlib.aclosing(engine.generate(req.prompt_ids, req.params, req.request_id)) as outputs:
            try:
                first = await _first_output(outputs, state)
                if req.stream:
                    return await _stream(request, req, outputs, first, progress)
                return await _complete(req, outputs, first, progress)
            except asyncio.CancelledError:           # client disconnect or shutdown
                state.metrics.cancelled.inc()
                raise


async def _first_output(outputs, state) -> RequestOutput:
    try:
        return await outputs.__anext__()
    except ValueError as exc:                       # add_request re-validates prompt and params
        raise bad_request(str(exc)) from None
    except RuntimeError as exc:
        if state.draining or "closed" in str(exc):
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        raise


async def _complete(req: oa.GenerationRequest, outputs, out: RequestOutput, progress: _Progress) -> web.Response:
    created = oa.now()
    progress.update(out)
    while not out.finished:
        out = await outputs.__anext__()
        progress.update(out)
    progress.finish()
    progress.metrics.finished.labels(out.finish_reason).inc()
    if out.finish_reason == "error":
        raise APIError(500, f"generation failed: {out.error or 'engine error'}", code="engine_error")
    if out.finish_reason == "abort":
        raise APIError(503, "the request was aborted (server shutting down)", code="aborted")
    return web.json_response(oa.response(req, out, created))


async def _stream(request: web.Request, req: oa.GenerationRequest, outputs, out: RequestOutput,
                  progress: _Progress) -> web.StreamResponse:
    created = oa.now()
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        await _write_chunks(resp, req, outputs, out, progress, created)
    except ConnectionResetError:                    # the client left; closing `outputs` aborts the request
        progress.metrics.cancelled.inc()
        return resp
    except asyncio.CancelledError:
        raise
    except Exception as exc:                        # headers are sent: report in-band, keep the server up
        log.exception("stream %s failed", req.request_id)
        await resp.write(oa.sse(error_body(500, f"internal error: {exc}")))
        await resp.write(oa.sse("[DONE]"))
    await resp.write_eof()
    return resp


async def _write_chunks(resp, req: oa.GenerationRequest, outputs, out: RequestOutput, progress: _Progress,
                        created: int) -> None:
    first_chunk = True
    while True:
        piece = progress.update(out)
        reason = oa.finish_reason(out)
        if piece or reason or (first_chunk and req.chat):
            await resp.write(oa.sse(oa.chunk(req, created, piece, reason, first=first_chunk)))
            first_chunk = False
        if out.finished:
            break
        out = await outputs.__anext__()
    progress.finish()
    progress.metrics.finished.labels(out.finish_reason).inc()
    if req.include_usage:
        await resp.write(oa.sse(oa.usage_chunk(req, created, out)))
    error = oa.stream_error(out)
    if error is not None:                            # after the text: clients that raise on it keep what came
        await resp.write(oa.sse(error))
    await resp.write(oa.sse("[DONE]"))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)

"""Run the app: `serve` (the `aurora serve` process) and `ServerThread` (tests, notebooks, benches).

Shutdown is graceful and bounded: stop listening, let in-flight requests finish for up
to `shutdown_timeout` seconds, abort the rest in the engine, then optionally save the
draft and close the engine (which stops the trainer).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

from aiohttp import web

from aurora.config import ServerConfig
from aurora.server.access_log import banner_lines, log_banner
from aurora.server.app import create_app
from aurora.server.state import ENGINE, STATE

log = logging.getLogger("aurora.server")
CANCEL_WAIT_S = 2.0                                  # for aborted requests to wind down


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Listen on host:port (0 = ephemeral); returns the runner and the base URL. aiohttp's
    own access log is off: our line per request (access_log.py) carries tokens and tau."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=CANCEL_WAIT_S, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{bound_host}:{bound_port}"


async def stop(runner: web.AppRunner, timeout: float) -> None:
    """Stop listening; give in-flight generations `timeout` seconds, then abort the rest
    in the engine (streams end with finish_reason "length" and an "aborted" error event, others get 503)."""
    state, engine = runner.app[STATE], runner.app[ENGINE]
    state.draining = True
    for site in list(runner.sites):
        await site.stop()
    await _wait_idle(state, timeout)
    for request_id in list(state.active):
        engine.abort(request_id)
    await _wait_idle(state, CANCEL_WAIT_S)
    await runner.cleanup()                           # closes keep-alives, cancels any straggler


async def _wait_idle(state, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.02)


def save_draft(engine, save_dir: str | None) -> None:
    flywheel = getattr(engine, "flywheel", None)
    save = getattr(flywheel, "save", None)
    if save_dir is None or not callable(save):
        return
    try:
        save(save_dir)
        print(f"saved draft to {save_dir}", flush=True)
    except Exception:
        log.exception("saving the draft to %s failed", save_dir)


# ---------------------------------------------------------------- the `aurora serve` process
def serve(engine, config: ServerConfig, shutdown_timeout: float = 10.0, access_log: bool = True) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully and close `engine`.
    `access_log`: one INFO line per request on the `aurora.access` logger."""
    if not access_log:
        logging.getLogger("aurora.access").setLevel(logging.WARNING)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(engine, config, shutdown_timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(engine, config: ServerConfig, shutdown_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():                        # a second signal: stop waiting for anyone
            print("forced exit", file=sys.stderr, flush=True)
            os._exit(1)
        print(f"received {signal.Signals(signum).name}: shutting down (again to force)", flush=True)
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    app = create_app(engine, config)
    try:
        runner, url = await start(app, config.host, config.port)
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr, flush=True)
        await loop.run_in_executor(None, engine.close)
        return 1
    for line in banner_lines(engine, config, url):  # stdout, like the other lifecycle lines
        print(line, flush=True)
    await stopping.wait()
    in_flight = app[STATE].in_flight
    if in_flight:
        print(f"waiting up to {shutdown_timeout:g}s for {in_flight} in-flight request(s)", flush=True)
    await stop(runner, shutdown_timeout)
    await loop.run_in_executor(None, save_draft, engine, config.save_dir)
    await loop.run_in_executor(None, engine.close)
    print("stopped", flush=True)
    return 0


# ---------------------------------------------------------------- background server
class ServerThread:
    """Serve `engine` from a daemon thread with its own event loop.

        with ServerThread(engine, ServerConfig(port=0)) as server:
            requests.get(server.url + "/health")

    The engine is not closed on exit (it belongs to the caller)."""

    def __init__(self, engine, config: ServerConfig | None = None, shutdown_timeout: float = 5.0):
        self.engine, self.config = engine, config or ServerConfig(port=0)
        self.shutdown_timeout = shutdown_timeout
        self.url: str | None = None
        self.app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aurora-server", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Graceful shutdown (see `stop`); returns once the thread has exited."""
        if self._loop is None or not self._thread.is_alive():
            return
        limit = self.shutdown_timeout + 3 * CANCEL_WAIT_S + 5
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(stop(self._runner, self.shutdown_timeout), self._loop).result(limit)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(limit)

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.app = create_app(self.engine, self.config)
            self._runner, self.url = loop.run_until_complete(start(self.app, self.config.host, self.config.port))
            log_banner(self.engine, self.config, self.url)
        except Exception as exc:  # noqa: BLE001 -- re-raised by start() in the caller's thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

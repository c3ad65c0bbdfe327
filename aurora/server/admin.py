"""Speculator admin: `GET /v1/speculator` (draft and trainer status) and `POST` actions.

POST {"action": "pause" | "resume" | "save" | "export"}. `save` writes only into the
directory the operator gave at startup (`--save-dir`); a client never chooses a path:
`export` ({"dir": NAME, "format": "eagle3" | "speculators"}) writes `<save-dir>/exports/NAME`. With a
`suffix` draft, `save` also writes its index there (user text; off with SpecConfig.suffix_persist=False). The
flywheel is optional and its API may be partial, so every call goes through getattr.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

from aurora.drafts.suffix import find_suffix
from aurora.server.errors import APIError, bad_request
from aurora.server.openai_api import parse_body
from aurora.server.state import CONFIG, ENGINE

ACTIONS = ("pause", "resume", "save", "export")
STATUS_KEYS = ("draft", "draft_version", "accepted_length", "accepted_length_recent", "acceptance_by_depth",
               "trainer", "buffer")


def speculator_status(engine, can_save: bool) -> dict:
    stats = engine.stats()
    status = {k: stats[k] for k in STATUS_KEYS if k in stats}
    flywheel = getattr(engine, "flywheel", None)
    status["online"] = flywheel is not None
    status["can_save"] = can_save and flywheel is not None
    stats_fn = getattr(flywheel, "stats", None)
    if "trainer" not in status and callable(stats_fn):      # the flywheel usually reports through stats()
        status["trainer"] = stats_fn()
    return status


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=_plain))


def _plain(value):
    """Make tensors, numpy scalars and paths JSON-safe."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


async def get_speculator(request: web.Request) -> web.Response:
    return _json(speculator_status(request.app[ENGINE], request.app[CONFIG].save_dir is not None))


async def post_speculator(request: web.Request) -> web.Response:
    body = parse_body(await request.read())
    action = body.get("action")
    if action not in ACTIONS:
        raise bad_request(f"'action' must be one of {', '.join(ACTIONS)}", "action")
    if action == "save" and set(body) - {"action"}:
        raise bad_request("'save' takes no arguments: drafts are saved into the server's --save-dir", "action")
    engine, save_dir = request.app[ENGINE], request.app[CONFIG].save_dir
    if action == "export":
        return await _export(engine, save_dir, body)
    flywheel = getattr(engine, "flywheel", None)
    suffix = find_suffix(engine.proposer) if action == "save" else None   # the memory of traffic
    if flywheel is None and suffix is None:
        raise APIError(409, "online training is off on this server (no flywheel); start it with --online "
                            "and a learnable draft", "action", "no_flywheel")
    if action == "save" and save_dir is None:
        raise APIError(409, "saving is disabled: the server was started without --save-dir", "action",
                       "no_save_dir")
    fn = getattr(flywheel, action, None) if flywheel is not None else None
    if flywheel is not None and not callable(fn):
        raise APIError(501, f"this flywheel does not support '{action}'", "action", "unsupported")
    args = (save_dir,) if action == "save" else ()
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, fn, *args) if fn is not None else None
    reply = {"action": action, "ok": True, "status": speculator_status(engine, save_dir is not None)}
    if suffix is not None:                 # None when SpecConfig.suffix_persist is off
        reply["suffix_index"] = await loop.run_in_executor(None, suffix.save, save_dir)
    if result is not None:
        reply["result"] = result
    return _json(reply)


async def _export(engine, save_dir: str | None, body: dict) -> web.Response:
    from pathlib import Path

    from aurora.flywheel.export import FORMATS, export_engine_draft
    if set(body) - {"action", "dir", "format"}:
        raise bad_request("'export' takes only 'dir' (a name under --save-dir/exports) and 'format'", "action")
    fmt, name = body.get("format", "eagle3"), body.get("dir", "")
    if fmt not in FORMATS:
        raise bad_request(f"'format' must be one of {', '.join(FORMATS)}", "format")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or name.startswith("."):
        raise bad_request("'dir' must be a plain directory name; exports go under --save-dir/exports", "dir")
    if save_dir is None:
        raise APIError(409, "exporting is disabled: the server was started without --save-dir", "action",
                       "no_save_dir")
    out = Path(save_dir) / "exports" / name
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, export_engine_draft, engine, out, fmt)
    except ValueError as exc:
        raise APIError(409, str(exc), "action", "no_eagle_draft") from exc
    return _json({"action": "export", "ok": True, "result": result})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/speculator", get_speculator)
    app.router.add_post("/v1/speculator", post_speculator)

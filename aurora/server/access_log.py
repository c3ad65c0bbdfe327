"""What the server says while it works: one access-log line per request, a line when a
long prefill starts, and the startup banner.

Lines go to the `aurora.access` logger at INFO (`aurora serve` logs at INFO by default;
`--no-access-log` silences them). Generation handlers leave their final `RequestOutput`
and first-token time in `request[GENERATION]`, so the line can carry tokens, tau and TTFT.
"""
from __future__ import annotations

import logging
import os

from aiohttp import web

access_log = logging.getLogger("aurora.access")
log = logging.getLogger("aurora.server")
LONG_PREFILL_TOKENS = 512                 # prompts at least this long get a "prefill started" line
# request key: the generation handler's progress (RequestKey needs aiohttp >= 3.11)
GENERATION = web.RequestKey("aurora_generation", object) if hasattr(web, "RequestKey") else "aurora_generation"


def access_line(method: str, path: str, status: int | str, seconds: float, generation=None) -> str:
    """`POST /v1/completions 200 prompt=12 completion=48 tau=2.10 ttft=0.210s latency=2.930s req=cmpl-..`."""
    parts = [method, path, str(status)]
    out = getattr(generation, "output", None)
    if out is not None:
        parts += [f"prompt={len(out.prompt_token_ids)}", f"completion={len(out.token_ids)}"]
        tau = (out.stats or {}).get("accepted_length")
        parts.append(f"tau={tau:.2f}" if tau is not None else "tau=-")
        first, start = getattr(generation, "first", None), getattr(generation, "start", None)
        parts.append(f"ttft={first - start:.3f}s" if first is not None and start is not None else "ttft=-")
    parts.append(f"latency={seconds:.3f}s")
    if out is not None:
        parts.append(f"req={out.request_id}")
    return " ".join(parts)


def log_request(request: web.Request, status: int | str, seconds: float) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(access_line(request.method, request.path, status, seconds, request.get(GENERATION)))


def log_prefill_start(request_id: str, num_prompt_tokens: int) -> None:
    """A long prompt can take seconds to minutes to prefill on a CPU: say it has started."""
    if num_prompt_tokens >= LONG_PREFILL_TOKENS:
        access_log.info("%s: prefill of %d prompt tokens started (long prompts take a while on CPU)",
                        request_id, num_prompt_tokens)


def banner_lines(engine, config, url: str) -> list[str]:
    """Startup banner: where the server listens and what it serves, with which settings."""
    ec = engine.config
    dtype = str(getattr(engine, "dtype", ec.dtype)).removeprefix("torch.")
    serve_threads = getattr(engine, "serve_threads", None)
    threads = serve_threads() if callable(serve_threads) else ec.threads
    trainer = "off"
    if getattr(engine, "flywheel", None) is not None:
        trainer = "on (its own thread and CUDA stream)" if engine.device.type == "cuda" \
            else (f"on (takes turns with serving: at most {ec.trainer.busy_share:.0%} of wall time while "
                  f"requests run, less while training stops earning; every core when idle)")
    if config.save_dir:
        saved = f"learned drafts are saved to {os.path.abspath(config.save_dir)} (on shutdown and on " \
                f"POST /v1/speculator {{\"action\": \"save\"}})"
    elif trainer != "off":
        saved = "learned drafts are NOT saved (no --save-dir): training is lost on exit"
    else:
        saved = "no online training: nothing to save"
    auth = "Bearer key required" if config.api_key else "no API key"
    return [(f"listening on {url} (OpenAI API at {url}/v1; {auth}; at most {config.max_concurrent} "
             f"concurrent generations)"),
            (f"model {ec.model} on {engine.device}, dtype {dtype}{_packed(engine)}{_fast(engine)}, "
             f"{threads} serving thread(s)"),
            f"draft {ec.draft} (version {engine.proposer.version}), online training {trainer}",
            saved]


def _packed(engine) -> str:
    """' (linear weights packed for oneDNN, +X MiB)' when the runner keeps packed weight copies."""
    size = getattr(getattr(engine, "runner", None), "packed_bytes", 0)
    return f" (linear weights packed for oneDNN, +{size >> 20} MiB)" if size else ""


def _fast(engine) -> str:
    """', hand-written Llama step' when the runner serves through models/fast_llama.py."""
    return ", hand-written Llama step" if getattr(getattr(engine, "runner", None), "fast", None) is not None else ""


def log_banner(engine, config, url: str) -> None:
    for line in banner_lines(engine, config, url):
        log.info(line)

"""OpenAI wire format: parse and validate request bodies, build responses and SSE chunks.

Validation is strict and happens before anything reaches the engine: every bad field
raises `APIError(4xx)` naming the field. Fields that would change the meaning of a
request but are not implemented (n > 1, logprobs, tools, penalties) are rejected, not
silently ignored; unknown extra fields are ignored, as OpenAI clients send many.

Finish reasons are only OpenAI's own: "stop" and "length". A stream the engine cut short
(shutdown abort) ends with finish_reason "length" (the text is truncated, as for a token
limit) followed by an in-band error event (code "aborted"); a stream whose generation failed
ends with an error event and no finish reason. Clients that switch on finish_reason never
see an unknown value; the official clients raise on the error event after the text.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from aurora.server.errors import APIError, bad_request, error_body
from aurora.types import MAX_TOKENS_LIMIT, RequestOutput, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
MIN_TEMPERATURE = 1e-5                  # below this, sample greedily (1/T would overflow)
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "length"}   # engine reason -> OpenAI's


@dataclass
class GenerationRequest:
    """One validated request, ready for `engine.generate`."""
    chat: bool
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------- body and field parsing
def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a finite number, got {json.dumps(value)[:40]}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(value)[:40]}", name)
    return value


def _text(value, param: str) -> str:
    """A string that the tokenizer can encode (no lone surrogates from JSON escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"'{param}' contains invalid Unicode (a lone surrogate)", param) from None
    return value


def _unsupported(body: dict) -> None:
    """Reject fields whose requested behaviour we cannot honour."""
    n = _int(body, "n", 1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n")
    if _int(body, "best_of", 1) != 1:
        raise bad_request("only best_of=1 is supported", "best_of")
    for name in ("logprobs", "top_logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise bad_request(f"'{name}' is not supported", name)
    for name in ("suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, [], {}, ""):
            raise bad_request(f"'{name}' is not supported", name)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("'tool_choice' is not supported", "tool_choice")
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if _float(body, name, neutral) != neutral:
            raise bad_request(f"'{name}' is not supported (only {neutral})", name)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(_text(s, "stop") for s in stops)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return stream, _bool(opts, "include_usage")


def check_model(body: dict, model_ids: tuple[str, ...]) -> str:
    model = body.get("model")
    if model is None:
        return model_ids[0]
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if model not in model_ids:
        raise APIError(404, f"the model '{model[:200]}' does not exist; this server serves "
                            f"{', '.join(repr(m) for m in model_ids)}", "model", "model_not_found")
    return model_ids[0]


# ---------------------------------------------------------------- prompts
def _completion_prompt(body: dict, engine, max_chars: int) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("only one prompt per request is supported", "prompt")
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise bad_request(f"prompt has {len(prompt)} characters; the limit is {max_chars}", "prompt",
                              "context_length_exceeded")
        _text(prompt, "prompt")
    elif not isinstance(prompt, list):
        raise bad_request("'prompt' must be a string or a list of token ids", "prompt")
    return _encode(engine.encode_prompt, prompt, "prompt")


def _message_content(content, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                  param)
            parts.append(_text(part["text"], param))
        return "".join(parts)
    raise bad_request(f"'{param}' must be a string or a list of text parts", param)


def _chat_prompt(body: dict, engine, max_chars: int) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        clean.append({"role": role, "content": _message_content(m.get("content"), i)})
    num_chars = sum(len(m["content"]) for m in clean)
    if num_chars > max_chars:
        raise bad_request(f"messages have {num_chars} characters; the limit is {max_chars}", "messages",
                          "context_length_exceeded")
    return _encode(engine.chat_prompt, clean, "messages")


def _encode(fn, prompt, param: str) -> list[int]:
    try:
        return fn(prompt)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    except Exception as exc:
        if type(exc).__module__.startswith("jinja2"):          # the chat template refused the messages
            raise bad_request(f"chat template error: {exc}", param) from None
        raise


# ---------------------------------------------------------------- whole requests
def parse_request(body: dict, engine, *, chat: bool, model_ids: tuple[str, ...],
                  max_prompt_chars: int) -> GenerationRequest:
    model = check_model(body, model_ids)
    _unsupported(body)
    stream, include_usage = _stream_options(body)
    stop = _stop(body)
    temperature = _float(body, "temperature", 1.0)
    top_p = _float(body, "top_p", 1.0)
    top_k = _int(body, "top_k", 0, lo=-1)
    seed = _int(body, "seed", None, lo=-(1 << 63), hi=(1 << 64) - 1)   # what torch.Generator accepts
    ignore_eos = _bool(body, "ignore_eos")
    if temperature < 0:
        raise bad_request(f"'temperature' must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, max_name, None, lo=1, hi=MAX_TOKENS_LIMIT)
    prompt_ids = _chat_prompt(body, engine, max_prompt_chars) if chat else \
        _completion_prompt(body, engine, max_prompt_chars)
    context = getattr(engine, "max_model_len", None) or (len(prompt_ids) + MAX_TOKENS_LIMIT)
    room = context - len(prompt_ids)
    if max_tokens is None:
        max_tokens = min(room, MAX_TOKENS_LIMIT) if chat else DEFAULT_COMPLETION_MAX_TOKENS
    if max_tokens > room:
        raise bad_request(f"this model's maximum context length is {context} tokens; the request asks for "
                          f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} "
                          f"for the completion)", max_name, "context_length_exceeded")
    try:
        params = SamplingParams(max_tokens=max_tokens,
                                temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                                top_p=top_p, top_k=max(top_k, 0), seed=seed, stop=stop or None,
                                ignore_eos=ignore_eos)
    except ValueError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None
    prefix = "chatcmpl" if chat else "cmpl"
    return GenerationRequest(chat, f"{prefix}-{uuid.uuid4().hex}", model, prompt_ids, params, stream,
                             include_usage)


# ---------------------------------------------------------------- responses
def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish reason of a finished output; None while running or when it failed."""
    return FINISH_REASONS.get(out.finish_reason) if out.finished else None


def stream_error(out: RequestOutput) -> dict | None:
    """The in-band error event that ends a stream the engine did not complete, else None."""
    if out.finish_reason == "error":
        return error_body(500, f"generation failed: {out.error or 'engine error'}", code="engine_error")
    if out.finish_reason == "abort":
        return error_body(503, "the generation was cut short: the server is shutting down", code="aborted")
    return None


def response(req: GenerationRequest, out: RequestOutput, created: int) -> dict:
    """The non-streaming body for a finished request."""
    choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(out)}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": out.text}
    else:
        choice["text"] = out.text
    return {"id": req.request_id, "object": "chat.completion" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [choice],
            "usage": usage(len(req.prompt_ids), len(out.token_ids)),
            "aurora": _request_stats(out)}


def chunk(req: GenerationRequest, created: int, text: str | None, reason: str | None = None,
          first: bool = False) -> dict:
    """One streamed chunk carrying `text` (and `reason` on the last)."""
    choice = {"index": 0, "logprobs": None, "finish_reason": reason}
    if req.chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": req.request_id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: GenerationRequest, created: int, out: RequestOutput) -> dict:
    return {"id": req.request_id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [],
            "usage": usage(len(req.prompt_ids), len(out.token_ids))}


def _request_stats(out: RequestOutput) -> dict:
    keys = ("accepted_length", "draft_version", "num_steps", "ttft_s", "latency_s")
    return {k: out.stats[k] for k in keys if k in out.stats}


def sse(data) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def now() -> int:
    return int(time.time())

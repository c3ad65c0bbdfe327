"""HTTP server: every endpoint, a table of bad inputs, auth, 413/429, disconnects, shutdown, openai client.

One tiny-llama engine is shared by the whole module; servers run on 127.0.0.1 with
ephemeral ports in background threads (`ServerThread`), clients run in the test thread.
"""
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from aurora import Engine, EngineConfig, ServerConfig
from aurora.server import ServerThread
from aurora.server.state import STATE

MODEL = "tiny-llama"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=MODEL, draft="ngram", online=False, dtype="float32"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServerConfig(port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def auth_server(engine):
    with ServerThread(engine, ServerConfig(port=0, api_key=KEY)) as srv:
        yield srv


# ---------------------------------------------------------------- helpers
def call(srv, method, path, body=None, headers=None, timeout=30):
    """(status, headers, parsed JSON or raw text) over a fresh loopback connection."""
    url = urlsplit(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw.decode("utf-8", "replace")
    return resp.status, dict(resp.getheaders()), data


def post(srv, path, body, **kw):
    return call(srv, "POST", path, body, **kw)


def sse_events(text):
    """Payloads of `data: ...` events, the last one being '[DONE]'."""
    events = [block[len("data: "):] for block in text.split("\n\n") if block.strip()]
    assert all(not e.startswith("data:") for e in events)
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def stream(srv, path, body, **kw):
    status, headers, raw = post(srv, path, {**body, "stream": True}, **kw)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def wait_idle(engine, timeout=5.0):
    """Poll until the engine runs nothing and every KV block is free; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout}s: {s}")
        time.sleep(0.02)


def assert_error(data, status):
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    assert data["error"]["message"]
    assert data["error"]["type"] == ("server_error" if status >= 500 else
                                     "rate_limit_error" if status == 429 else "invalid_request_error")


GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


# ---------------------------------------------------------------- simple endpoints
def test_health_and_models(server):
    status, _, data = call(server, "GET", "/health")
    assert status == 200 and data["status"] == "ok" and data["model"] == MODEL
    status, _, data = call(server, "GET", "/v1/models")
    assert status == 200 and data["object"] == "list" and [m["id"] for m in data["data"]] == [MODEL]
    for name in (MODEL, "aurora"):
        status, _, data = call(server, "GET", f"/v1/models/{name}")
        assert status == 200 and data["id"] == MODEL
    status, _, data = call(server, "GET", "/v1/models/gpt-4")
    assert status == 404 and data["error"]["code"] == "model_not_found"


def test_completion(server):
    status, _, data = post(server, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 7, **GREEDY})
    assert status == 200, data
    assert data["object"] == "text_completion" and data["model"] == MODEL and data["id"].startswith("cmpl-")
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    # the alias, token-id prompts and a batch of one are the same request
    ids = [b + 3 for b in b"hello"]                              # the byte tokenizer: id = byte + 3
    for prompt, model in ((ids, "aurora"), (["hello"], MODEL), ([ids], MODEL)):
        status, _, again = post(server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 7,
                                                            **GREEDY})
        assert status == 200 and again["choices"][0]["text"] == choice["text"]


def test_completion_defaults_and_seed(server):
    status, _, data = post(server, "/v1/completions", {"prompt": "abc", "ignore_eos": True})
    assert status == 200 and data["usage"]["completion_tokens"] == 16     # OpenAI's default max_tokens
    body = {"prompt": "seeded", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": True}
    texts = {post(server, "/v1/completions", body)[2]["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1


def test_stream_matches_non_stream(server):
    body = {"prompt": "stream me", "max_tokens": 24, **GREEDY}
    full = post(server, "/v1/completions", body)[2]["choices"][0]["text"]
    events = stream(server, "/v1/completions", body)
    assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == full
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert len({e["id"] for e in events}) == 1 and "usage" not in events[-1]


def test_stop_strings_never_leak_into_the_stream(server):
    body = {"prompt": "stop test", "max_tokens": 32, **GREEDY}
    full = post(server, "/v1/completions", body)[2]["choices"][0]["text"]
    start = next(i for i in range(4, len(full) - 3) if full.find(full[i:i + 3]) == i and "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    for stops in (stop, [stop, "never-appears"]):
        _, _, data = post(server, "/v1/completions", {**body, "stop": stops})
        assert data["choices"][0]["text"] == full[:start] and data["choices"][0]["finish_reason"] == "stop"
        events = stream(server, "/v1/completions", {**body, "stop": stops})
        assert "".join(e["choices"][0]["text"] for e in events) == full[:start]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat(server):
    status, _, data = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 9,
                                                            **GREEDY})
    assert status == 200, data
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 9 and data["usage"]["prompt_tokens"] > 9
    # max_completion_tokens wins over max_tokens; text content parts equal a plain string
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    status, _, again = post(server, "/v1/chat/completions", {"messages": [CHAT[0]] + parts, "max_tokens": 3,
                                                             "max_completion_tokens": 9, **GREEDY})
    assert status == 200 and again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_stream_with_usage(server):
    body = {"messages": CHAT, "max_tokens": 10, **GREEDY}
    full = post(server, "/v1/chat/completions", body)[2]
    events = stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in chunks)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == \
        full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == full["usage"]


def test_metrics(server, engine):
    post(server, "/v1/completions", {"prompt": "metrics", "max_tokens": 8, **GREEDY})
    stream(server, "/v1/completions", {"prompt": "metrics", "max_tokens": 8, **GREEDY})
    engine.stats_extra["trainer"] = lambda: {"steps": 12, "losses": {"imitation": 1.5, "discard": 0.25},
                                             "swaps": 3, "rollbacks": 1}
    engine.stats_extra["buffer"] = lambda: {"fill": 0.5, "dropped": 4}
    engine.stats_extra["draft_sources"] = lambda: {"by_coverage": {"match3+": {"gain": 0.1, "cost": 0.2, "share": 0.6},
                                                                   "none": {"gain": 0.5, "cost": 0.2, "share": 0.4}}}
    try:
        status, headers, text = call(server, "GET", "/metrics")
    finally:
        engine.stats_extra.pop("trainer")
        engine.stats_extra.pop("buffer")
        engine.stats_extra.pop("draft_sources")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in ('aurora_http_requests_total{method="POST",route="/v1/completions",status="200"}',
                 'aurora_http_request_duration_seconds_count{route="/v1/completions"}',
                 "aurora_time_to_first_token_seconds_count", "aurora_inter_token_latency_seconds_count",
                 "aurora_generated_tokens_total", "aurora_tokens_per_second", "aurora_accepted_length ",
                 'aurora_acceptance_rate{depth="1"}', "aurora_draft_version 0.0", "aurora_kv_blocks_total 1024.0",
                 "aurora_prefix_cache_hit_tokens_total", "aurora_prefix_cache_blocks",
                 "aurora_trainer_steps_total 12.0", 'aurora_trainer_loss{term="imitation"} 1.5',
                 "aurora_draft_swaps_total 3.0", "aurora_draft_rollbacks_total 1.0", "aurora_buffer_fill 0.5",
                 "aurora_buffer_dropped_total 4.0", 'aurora_learned_gain_by_coverage{group="none"} 0.5',
                 'aurora_learned_coverage_share{group="match3+"} 0.6'):
        assert line in text, line
    # without online training the trainer families are simply absent
    assert "aurora_trainer_steps" not in call(server, "GET", "/metrics")[2]


def test_unexpected_errors_are_json_500s(server, engine, monkeypatch):
    def broken():
        raise RuntimeError("stats exploded")
    monkeypatch.setattr(engine, "stats", broken)
    status, _, data = call(server, "GET", "/health")
    assert status == 500 and data["error"]["type"] == "server_error" and "exploded" not in data["error"]["message"]
    assert call(server, "GET", "/metrics")[0] == 200                     # scrapes survive a broken engine
    monkeypatch.undo()
    assert call(server, "GET", "/health")[0] == 200


def test_engine_failure_mid_generation(server, engine, monkeypatch):
    """A failed engine step ends the request with an error: 500 JSON, or an in-band SSE error event."""
    def boom(batch):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine.runner, "forward", boom)
    status, _, data = post(server, C, {"prompt": "hi", "max_tokens": 4})
    assert status == 500 and data["error"]["code"] == "engine_error" and "boom" in data["error"]["message"]
    events = stream(server, C, {"prompt": "hi", "max_tokens": 4})
    assert events[-1]["error"]["code"] == "engine_error"
    monkeypatch.undo()
    wait_idle(engine)
    assert post(server, C, OK_C)[0] == 200


# ---------------------------------------------------------------- bad input, table-driven
C, H = "/v1/completions", "/v1/chat/completions"
OK_C = {"prompt": "hi", "max_tokens": 4}
OK_H = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    # (case, path, body, status, param)
    ("malformed json", C, b'{"prompt": "hi",', 400, None),
    ("empty body", C, b"", 400, None),
    ("array body", C, b"[1, 2]", 400, None),
    ("string body", H, b'"hello"', 400, None),
    ("invalid utf-8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("NaN literal", C, b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("deep nesting", C, b"[" * 50000 + b"]" * 50000, 400, None),
    ("lone surrogate", C, b'{"prompt": "a\\ud800"}', 400, "prompt"),
    ("missing prompt", C, {"max_tokens": 4}, 400, "prompt"),
    ("null prompt", C, {"prompt": None}, 400, "prompt"),
    ("empty prompt", C, {"prompt": ""}, 400, "prompt"),
    ("number prompt", C, {"prompt": 5}, 400, "prompt"),
    ("object prompt", C, {"prompt": {"a": 1}}, 400, "prompt"),
    ("empty token list", C, {"prompt": []}, 400, "prompt"),
    ("negative token id", C, {"prompt": [5, -1]}, 400, "prompt"),
    ("token id beyond vocab", C, {"prompt": [10 ** 9]}, 400, "prompt"),
    ("two prompts", C, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt beyond context", C, {"prompt": "x" * 5000}, 400, "prompt"),
    ("prompt beyond char limit", C, {"prompt": "x" * 300_000}, 400, "prompt"),
    ("prompt + max_tokens beyond context", C, {"prompt": "x" * 1000, "max_tokens": 1500}, 400, "max_tokens"),
    ("max_tokens string", C, {**OK_C, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens float", C, {**OK_C, "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens bool", C, {**OK_C, "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens zero", C, {**OK_C, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", C, {**OK_C, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens huge", C, {**OK_C, "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ("temperature string", C, {**OK_C, "temperature": "hot"}, 400, "temperature"),
    ("temperature negative", C, {**OK_C, "temperature": -0.5}, 400, "temperature"),
    ("temperature overflow", C, {**OK_C, "temperature": 1e400}, 400, None),     # JSON Infinity
    ("top_p zero", C, {**OK_C, "top_p": 0}, 400, "top_p"),
    ("top_p above one", C, {**OK_C, "top_p": 1.5}, 400, "top_p"),
    ("top_p string", C, {**OK_C, "top_p": "all"}, 400, "top_p"),
    ("stop number", C, {**OK_C, "stop": 5}, 400, "stop"),
    ("stop empty string", C, {**OK_C, "stop": [""]}, 400, "stop"),
    ("stop list of numbers", C, {**OK_C, "stop": [1, 2]}, 400, "stop"),
    ("too many stops", C, {**OK_C, "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("seed string", C, {**OK_C, "seed": "x"}, 400, "seed"),
    ("seed beyond 64 bits", C, {**OK_C, "seed": 2 ** 64}, 400, "seed"),
    ("n = 2", C, {**OK_C, "n": 2}, 400, "n"),
    ("n string", C, {**OK_C, "n": "1"}, 400, "n"),
    ("best_of", C, {**OK_C, "best_of": 3}, 400, "best_of"),
    ("stream not bool", C, {**OK_C, "stream": "yes"}, 400, "stream"),
    ("stream_options not object", C, {**OK_C, "stream": True, "stream_options": 5}, 400, "stream_options"),
    ("logprobs", C, {**OK_C, "logprobs": 5}, 400, "logprobs"),
    ("echo", C, {**OK_C, "echo": True}, 400, "echo"),
    ("presence_penalty", C, {**OK_C, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("unknown model", C, {**OK_C, "model": "gpt-4"}, 404, "model"),
    ("model not a string", C, {**OK_C, "model": 5}, 400, "model"),
    ("missing messages", H, {"max_tokens": 4}, 400, "messages"),
    ("messages string", H, {"messages": "hi"}, 400, "messages"),
    ("messages empty", H, {"messages": []}, 400, "messages"),
    ("message not object", H, {"messages": [5]}, 400, "messages[0]"),
    ("unknown role", H, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("content number", H, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image content", H, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("chat beyond context", H, {"messages": [{"role": "user", "content": "y" * 5000}]}, 400, "messages"),
    ("max_completion_tokens string", H, {**OK_H, "max_completion_tokens": "x"}, 400, "max_completion_tokens"),
    ("max_completion_tokens zero", H, {**OK_H, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat n = 3", H, {**OK_H, "n": 3}, 400, "n"),
    ("chat temperature negative", H, {**OK_H, "temperature": -1}, 400, "temperature"),
    ("tools", H, {**OK_H, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("json mode", H, {**OK_H, "response_format": {"type": "json_object"}}, 400, "response_format"),
]


@pytest.mark.parametrize("case,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, case, path, body, status, param):
    got, _, data = post(server, path, body)
    assert got == status, data
    assert_error(data, status)
    if param is not None:
        assert data["error"]["param"] == param, data


def test_bad_input_leaves_the_server_healthy(server, engine):
    before = engine.stats()["num_errors"]
    for _, path, body, _, _ in BAD[::3]:
        post(server, path, {**body, "stream": True} if isinstance(body, dict) else body)
    assert engine.stats()["num_errors"] == before
    wait_idle(engine)
    assert post(server, C, OK_C)[0] == 200


def test_tiny_temperature_samples_greedily(server, engine):
    """1/T overflows for subnormal T; the server must not hand that to the engine (NaN kills the batch)."""
    before = engine.stats()["num_errors"]
    status, _, data = post(server, C, {"prompt": "hi", "max_tokens": 4, "temperature": 1e-300, "ignore_eos": True})
    assert status == 200 and data["choices"][0]["finish_reason"] == "length"
    assert engine.stats()["num_errors"] == before


@pytest.mark.parametrize("method,path,status", [("GET", "/nope", 404), ("DELETE", "/v1/models", 405),
                                                ("GET", "/v1/completions", 405)])
def test_unknown_routes(server, method, path, status):
    got, _, data = call(server, method, path)
    assert got == status
    assert_error(data, status)


def test_oversized_body_is_413(engine):
    with ServerThread(engine, ServerConfig(port=0, max_body_bytes=4096)) as srv:
        status, _, data = post(srv, C, {"prompt": "x" * 5000})
        assert status == 413 and "4096" in data["error"]["message"]
        assert_error(data, 413)
        assert post(srv, C, OK_C)[0] == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer "}, {"Authorization": KEY},
                                     {"Authorization": "Bearer k\xe9y\xff"}])             # not UTF-8 on the wire
def test_auth_rejects(auth_server, headers):
    for method, path, body in (("POST", C, OK_C), ("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("GET", "/v1/speculator", None)):
        status, resp_headers, data = call(auth_server, method, path, body, headers=headers)
        assert status == 401 and resp_headers.get("WWW-Authenticate") == "Bearer"
        assert_error(data, 401)


def test_auth_accepts(auth_server):
    ok = {"Authorization": f"Bearer {KEY}"}
    assert post(auth_server, C, OK_C, headers=ok)[0] == 200
    assert call(auth_server, "GET", "/v1/models", headers=ok)[0] == 200
    assert call(auth_server, "GET", "/health")[0] == 200                   # probes need no key


# ---------------------------------------------------------------- speculator admin
class FakeFlywheel:
    def __init__(self):
        self.calls = []

    def pause(self):
        self.calls.append(("pause",))

    def resume(self):
        self.calls.append(("resume",))

    def save(self, path):
        self.calls.append(("save", path))
        return {"version": 3}

    def stats(self):
        return {"paused": bool(self.calls) and self.calls[-1] == ("pause",)}


def test_speculator_without_flywheel(server):
    status, _, data = call(server, "GET", "/v1/speculator")
    assert status == 200 and data["online"] is False and data["draft"] == "ngram"
    assert "accepted_length" in data and "draft_version" in data
    for action in ("pause", "resume", "save"):
        status, _, data = post(server, "/v1/speculator", {"action": action})
        assert status == 409 and data["error"]["code"] == "no_flywheel"


@pytest.mark.parametrize("body", [{"action": "explode"}, {}, {"action": 5}, [1], {"action": "save", "path": "/etc"},
                                  {"action": "save", "dir": "/tmp/x"}])
def test_speculator_bad_requests(server, body):
    status, _, data = post(server, "/v1/speculator", body)
    assert status == 400
    assert_error(data, 400)


def test_speculator_with_flywheel(engine, tmp_path, monkeypatch):
    fake = FakeFlywheel()
    monkeypatch.setattr(engine, "flywheel", fake)
    with ServerThread(engine, ServerConfig(port=0)) as srv:             # no --save-dir: saving refused
        status, _, data = post(srv, "/v1/speculator", {"action": "save"})
        assert status == 409 and data["error"]["code"] == "no_save_dir"
    with ServerThread(engine, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
        status, _, data = call(srv, "GET", "/v1/speculator")
        assert status == 200 and data["online"] is True and data["can_save"] is True
        assert post(srv, "/v1/speculator", {"action": "pause"})[2]["status"]["trainer"] == {"paused": True}
        assert post(srv, "/v1/speculator", {"action": "resume"})[0] == 200
        status, _, data = post(srv, "/v1/speculator", {"action": "save"})
        assert status == 200 and data["result"] == {"version": 3}
    assert fake.calls == [("pause",), ("resume",), ("save", str(tmp_path))]


def test_speculator_with_the_real_flywheel(tmp_path):
    eng = Engine(EngineConfig(model=MODEL, draft="eagle", online=True, dtype="float32"))
    try:
        assert eng.flywheel is not None
        with ServerThread(eng, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
            assert post(srv, C, {"prompt": "abc abc abc abc", "max_tokens": 16})[0] == 200
            status, _, data = call(srv, "GET", "/v1/speculator")
            assert status == 200 and data["online"] is True and data["draft"] == "eagle"
            assert {"steps", "losses", "swaps"} <= set(data["trainer"]) and "fill" in data["buffer"]
            status, _, data = post(srv, "/v1/speculator", {"action": "pause"})
            assert status == 200 and data["status"]["trainer"]["paused"] is True
            metrics = call(srv, "GET", "/metrics")[2]
            for name in ("aurora_trainer_steps_total", "aurora_trainer_paused 1.0", "aurora_draft_swaps_total",
                         "aurora_buffer_fill", "aurora_buffer_dropped_total"):
                assert name in metrics, name
            assert post(srv, "/v1/speculator", {"action": "resume"})[0] == 200
            status, _, data = post(srv, "/v1/speculator", {"action": "save"})
            assert status == 200, data
        assert any(tmp_path.iterdir())
    finally:
        eng.close()


# ---------------------------------------------------------------- disconnects, limits, shutdown
LONG = {"prompt": "a long one", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


async def _open_stream(session, url, body):
    """Start a streaming request and read its first event."""
    resp = await session.post(url + C, json={**body, "stream": True})
    assert resp.status == 200
    line = await resp.content.readline()
    assert line.startswith(b"data: {")
    return resp


def test_stream_disconnect_frees_kv(server, engine):
    wait_idle(engine)
    tokens_before = engine.stats()["num_tokens"]

    async def run():
        async with aiohttp.ClientSession() as session:
            resp = await _open_stream(session, server.url, LONG)
            assert engine.stats()["running"] == 1
            resp.close()                                      # drop the connection mid-stream
    asyncio.run(run())
    wait_idle(engine, timeout=5)
    assert engine.stats()["num_tokens"] - tokens_before < LONG["max_tokens"]   # aborted, not completed


def test_non_stream_disconnect_frees_kv(server, engine):
    wait_idle(engine)
    tokens_before = engine.stats()["num_tokens"]

    async def run():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(server.url + C, json=LONG, timeout=aiohttp.ClientTimeout(total=0.5))
    asyncio.run(run())
    wait_idle(engine, timeout=5)
    assert engine.stats()["num_tokens"] - tokens_before < LONG["max_tokens"]


def test_concurrency_limit_is_429(engine):
    with ServerThread(engine, ServerConfig(port=0, max_concurrent=1)) as srv:
        async def run():
            async with aiohttp.ClientSession() as session:
                resp = await _open_stream(session, srv.url, LONG)
                async with session.post(srv.url + C, json=OK_C) as second:
                    assert second.status == 429 and second.headers["Retry-After"] == "1"
                    assert_error(await second.json(), 429)
                resp.close()
        asyncio.run(run())
        wait_idle(engine)
        assert post(srv, C, OK_C)[0] == 200
        assert post(srv, C, OK_C)[0] == 200


def test_shutdown_finishes_short_requests(engine):
    srv = ServerThread(engine, ServerConfig(port=0), shutdown_timeout=10).start()
    result = {}
    client = threading.Thread(target=lambda: result.update(r=post(srv, C, {"prompt": "x", "max_tokens": 60,
                                                                             **GREEDY})))
    client.start()
    while srv.app[STATE].in_flight == 0 and client.is_alive():
        time.sleep(0.005)
    srv.stop()
    client.join(10)
    status, _, data = result["r"]
    assert status == 200 and data["usage"]["completion_tokens"] == 60
    wait_idle(engine)


def test_shutdown_aborts_long_requests_after_the_timeout(engine):
    srv = ServerThread(engine, ServerConfig(port=0), shutdown_timeout=0.3).start()

    async def run():
        async with aiohttp.ClientSession() as session:
            streamed = await _open_stream(session, srv.url, LONG)
            waiting = asyncio.ensure_future(session.post(srv.url + C, json=LONG))
            while srv.app[STATE].in_flight < 2:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, srv.stop)
            assert time.monotonic() - t0 < 5
            events = sse_events((await streamed.content.read()).decode())
            # OpenAI's reasons only: the cut-short text ends with "length", then an in-band error
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "aborted"
            assert events[-3]["choices"][0]["finish_reason"] == "length"
            assert {e["choices"][0]["finish_reason"] for e in events[:-2]} <= {None, "length"}
            resp = await waiting
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "aborted"
    asyncio.run(run())
    wait_idle(engine)


# ---------------------------------------------------------------- the official openai client
def test_openai_client(auth_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL]

    done = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0)
    assert done.usage.prompt_tokens == 5 and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text

    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hello", max_tokens=8, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=8)
    bad = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------- the command line
def test_cli_forwards_bench_and_demo(monkeypatch, capsys):
    from aurora import cli

    class Fake:
        @staticmethod
        def main(argv):
            Fake.argv = argv
            return 0
    monkeypatch.setitem(sys.modules, "fake_bench_module", Fake)
    monkeypatch.setitem(cli.FORWARDED, "bench", ("fake_bench_module", "run benchmarks"))
    monkeypatch.setitem(cli.FORWARDED, "demo", ("no_such_module_here", "run the demo"))
    assert cli.main(["bench", "--requests", "5", "-x"]) == 0 and Fake.argv == ["--requests", "5", "-x"]
    assert cli.main(["demo", "--fast"]) == 2
    assert "aurora demo: unavailable" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--no-online", "--port", "0", "--model", MODEL])
    assert args.online is False and args.port == 0 and args.host == "127.0.0.1"


def test_python_dash_m_aurora():
    out = subprocess.run([sys.executable, "-m", "aurora", "serve", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and "--max-concurrent" in out.stdout and "--no-online" in out.stdout


def test_cli_serve_runs_and_shuts_down_on_sigterm(tmp_path, monkeypatch, capsys):
    """`aurora serve` in this process (main thread, real signal handling); SIGTERM comes from a helper thread."""
    from aurora import cli
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AURORA_API_KEY", KEY)
    seen = {}

    def client():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                seen["status"] = conn.getresponse().status
                conn.close()
                break
            except OSError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    rc = cli.main(["serve", "--model", MODEL, "--draft", "ngram", "--no-online", "--dtype", "float32", "--adaptive",
                   "--port", str(port), "--save-dir", str(tmp_path / "drafts"), "--shutdown-timeout", "1"])
    helper.join(5)
    out = capsys.readouterr().out
    assert rc == 0 and seen["status"] == 401                 # the key came from AURORA_API_KEY
    assert "loading model tiny-llama" in out and f"listening on http://127.0.0.1:{port}" in out
    assert "adaptive tree policy on" in out                  # --adaptive reached the engine's SpecConfig
    assert "shutting down" in out and out.rstrip().endswith("stopped")
    assert (tmp_path / "drafts").is_dir()


# ---------------------------------------------------------------- finish reasons and fault metrics
def test_finish_reasons_are_openai_values():
    """Only "stop" and "length" ever reach a client as finish_reason; aborted and failed
    generations carry an error event instead."""
    from aurora.server import openai_api as oa
    from aurora.types import RequestOutput

    def out(reason, error=None):
        return RequestOutput(request_id="r", prompt_token_ids=[1], token_ids=[2], text="x", delta_token_ids=[2],
                             delta_text="x", finished=True, finish_reason=reason, error=error, stats={})
    assert [oa.finish_reason(out(r)) for r in ("stop", "length", "abort", "error")] == ["stop", "length", "length",
                                                                                        None]
    assert oa.stream_error(out("stop")) is None and oa.stream_error(out("length")) is None
    assert oa.stream_error(out("abort"))["error"]["code"] == "aborted"
    assert oa.stream_error(out("error", "boom"))["error"]["code"] == "engine_error"


def test_openai_client_sees_the_text_then_an_error_on_abort(engine):
    """The official client yields the cut-short chunks (finish_reason "length"), then raises."""
    openai = pytest.importorskip("openai")
    srv = ServerThread(engine, ServerConfig(port=0), shutdown_timeout=0.3).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    reasons, raised = [], []

    def consume():
        try:
            for ev in client.completions.create(model=MODEL, prompt="x", max_tokens=1500, stream=True, temperature=0,
                                                extra_body={"ignore_eos": True}):
                reasons.append(ev.choices[0].finish_reason)
        except openai.APIError as exc:
            raised.append(exc)
    t = threading.Thread(target=consume)
    t.start()
    while not reasons and t.is_alive():
        time.sleep(0.01)
    srv.stop()
    t.join(10)
    assert reasons and reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert raised and "shutting down" in str(raised[0])
    wait_idle(engine)


def test_fault_metrics(server, engine, monkeypatch):
    """Draft failures, forward retries and per-reason finished generations reach /metrics."""
    wait_idle(engine)
    before = engine.stats()
    inner = engine.proposer.propose

    def propose(seqs, ctx):
        if len(seqs) > 0:
            raise RuntimeError("injected draft failure")
        return inner(seqs, ctx)
    monkeypatch.setattr(engine.proposer, "propose", propose)
    status, _, data = post(server, C, {"prompt": "abc abc abc abc", "max_tokens": 6, **GREEDY})
    assert status == 200 and data["choices"][0]["finish_reason"] == "length"
    monkeypatch.undo()
    text = call(server, "GET", "/metrics")[2]
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["aurora_draft_failures_total"] == engine.stats()["draft_failures"] > before["draft_failures"]
    assert values["aurora_engine_forward_retries_total"] == engine.stats()["num_forward_retries"]
    assert values["aurora_learned_draft_off"] == 0.0 and "aurora_draft_switch_offs_total" in values
    assert values['aurora_http_generations_finished_total{finish_reason="length"}'] >= 1

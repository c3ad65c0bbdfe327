"""The server says what it is doing: one access-log line per request (tokens, tau, TTFT,
latency), a line when a long prefill starts, and a startup banner (model, draft, dtype,
threads, where learned drafts are saved). Checked with caplog on a tiny-llama server.
"""
import http.client
import json
import logging
import re
from urllib.parse import urlsplit

import pytest

from aurora import Engine, EngineConfig, ServerConfig
from aurora.server import ServerThread
from aurora.server.access_log import LONG_PREFILL_TOKENS, banner_lines

LINE = re.compile(r"^POST /v1/completions 200 prompt=(\d+) completion=(\d+) tau=(\d+\.\d\d) "
                  r"ttft=(\d+\.\d+)s latency=(\d+\.\d+)s req=\S+$")


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32"))
    yield eng
    eng.close()


def _post(url, path, body):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _get(url, path):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def _access(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "aurora.access"]


def test_one_access_line_per_request_with_tokens_tau_ttft(engine, caplog):
    caplog.set_level(logging.INFO, logger="aurora")
    with ServerThread(engine, ServerConfig(port=0)) as srv:
        status, data = _post(srv.url, "/v1/completions", {"prompt": "abcabcabcabc", "max_tokens": 12,
                                                          "temperature": 0})
        assert status == 200
        usage = json.loads(data)["usage"]
        status, _ = _post(srv.url, "/v1/completions", {"prompt": "abc", "max_tokens": 6, "temperature": 0,
                                                       "stream": True})
        assert status == 200
        assert _get(srv.url, "/health") == 200
        assert _get(srv.url, "/nope") == 404
        status, _ = _post(srv.url, "/v1/completions", {"prompt": "abc", "max_tokens": 0})
        assert status == 400
    lines = _access(caplog)
    assert len(lines) == 5, lines
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == usage["prompt_tokens"] and int(m.group(2)) == usage["completion_tokens"]
    assert float(m.group(3)) >= 1.0                                    # tau counts the bonus token
    assert float(m.group(4)) <= float(m.group(5))                      # TTFT within the latency
    assert LINE.match(lines[1]), lines[1]                              # streamed: same fields
    assert re.match(r"^GET /health 200 latency=\d+\.\d+s$", lines[2]), lines[2]
    assert re.match(r"^GET /nope 404 latency=", lines[3]), lines[3]
    assert re.match(r"^POST /v1/completions 400 latency=", lines[4]), lines[4]


def test_long_prefill_gets_a_start_line(engine, caplog):
    caplog.set_level(logging.INFO, logger="aurora")
    n = LONG_PREFILL_TOKENS + 10
    with ServerThread(engine, ServerConfig(port=0)) as srv:
        status, _ = _post(srv.url, "/v1/completions", {"prompt": "x" * 8, "max_tokens": 2})
        assert status == 200
        status, _ = _post(srv.url, "/v1/completions", {"prompt": "y" * n, "max_tokens": 2})   # 1 byte = 1 token
        assert status == 200
    lines = _access(caplog)
    starts = [ln for ln in lines if "prefill" in ln]
    assert len(starts) == 1 and f"prefill of {n} prompt tokens started" in starts[0], lines
    assert lines.index(starts[0]) < len(lines) - 1                     # before that request's access line


def test_no_access_log_flag_silences_lines(engine, caplog):
    caplog.set_level(logging.INFO, logger="aurora")
    access = logging.getLogger("aurora.access")
    access.setLevel(logging.WARNING)                                   # what --no-access-log does
    try:
        with ServerThread(engine, ServerConfig(port=0)) as srv:
            assert _get(srv.url, "/health") == 200
    finally:
        access.setLevel(logging.NOTSET)
    assert _access(caplog) == []


def test_startup_banner(engine, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="aurora")
    with ServerThread(engine, ServerConfig(port=0, save_dir=str(tmp_path))) as srv:
        url = srv.url
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "aurora.server")
    assert f"listening on {url}" in text
    assert "model tiny-llama on cpu, dtype float32" in text
    assert f"{engine.serve_threads()} serving thread(s)" in text
    assert "draft ngram (version 0), online training off" in text
    assert str(tmp_path) in text


def test_banner_says_when_learned_drafts_are_lost():
    eng = Engine(EngineConfig(model="tiny-llama", draft="eagle", online=True, dtype="float32"))
    try:
        lines = banner_lines(eng, ServerConfig(port=0), "http://127.0.0.1:1")
    finally:
        eng.close()
    assert any("online training on" in ln for ln in lines), lines
    assert any("NOT saved" in ln and "--save-dir" in ln for ln in lines), lines


def test_banner_says_when_linear_weights_are_packed():
    eng = Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32", packed_linears=False))
    try:
        plain = banner_lines(eng, ServerConfig(port=0), "http://127.0.0.1:1")
        eng.runner.packed_bytes = 5 << 20                     # as a CPU engine that packed its weights
        kept = banner_lines(eng, ServerConfig(port=0), "http://127.0.0.1:1")
    finally:
        eng.close()
    assert not any("packed" in ln for ln in plain), plain
    assert any("linear weights packed for oneDNN, +5 MiB" in ln for ln in kept), kept
    assert any("hand-written Llama step" in ln for ln in plain), plain     # tiny-llama on CPU: the fast path


def test_banner_and_stats_say_which_forward_serves():
    for on in (True, False):
        with Engine(EngineConfig(model="tiny-llama", draft="none", online=False, dtype="float32",
                                 fast_path=on)) as eng:
            lines = banner_lines(eng, ServerConfig(port=0), "http://127.0.0.1:1")
            assert eng.stats()["fast_path"] is on
        assert any("hand-written Llama step" in ln for ln in lines) is on, lines

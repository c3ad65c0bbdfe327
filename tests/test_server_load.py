"""Bounded load on loopback: 32 concurrent streaming clients, 200 requests, tiny model.

Asserts correctness only (every stream completes, no errors, no KV leak, metrics agree);
latency percentiles are printed, never asserted (this runs on 2 shared CPU cores).
"""
import asyncio
import json
import statistics
import time

import aiohttp
import pytest

from aurora import Engine, EngineConfig, ServerConfig
from aurora.server import ServerThread

NUM_CLIENTS = 32
NUM_REQUESTS = 200
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny-llama", draft="ngram", online=False, dtype="float32"))
    yield eng
    eng.close()


async def _one(session, url, i):
    """One streamed request; returns (latency, time to first token, text, finish_reason)."""
    chat = i % 2 == 1
    body = {"max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"question {i}: why?"}]
    else:
        path, body["prompt"] = "/v1/completions", f"request {i} says hello " * (1 + i % 5)
    t0 = time.perf_counter()
    ttft, pieces, reason, done = None, [], None, False
    async with session.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):].strip()
            if payload == b"[DONE]":
                done = True
                continue
            event = json.loads(payload)
            assert "error" not in event, event
            choice = event["choices"][0]
            piece = choice["delta"].get("content") if chat else choice["text"]
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            pieces.append(piece or "")
            reason = choice["finish_reason"] or reason
    assert done, f"request {i} ended without [DONE]"
    return time.perf_counter() - t0, ttft, "".join(pieces), reason


def test_load_streaming_clients(engine):
    with ServerThread(engine, ServerConfig(port=0, max_concurrent=64)) as server:
        async def client(session, queue, results):
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = await _one(session, server.url, i)

        async def run():
            queue = asyncio.Queue()
            for i in range(NUM_REQUESTS):
                queue.put_nowait(i)
            results = {}
            connector = aiohttp.TCPConnector(limit=NUM_CLIENTS)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
                await asyncio.gather(*(client(session, queue, results) for _ in range(NUM_CLIENTS)))
                async with session.get(server.url + "/metrics") as resp:
                    metrics = await resp.text()
            return results, metrics

        errors_before = engine.stats()["num_errors"]
        t0 = time.perf_counter()
        results, metrics = asyncio.run(run())
        wall = time.perf_counter() - t0

    assert len(results) == NUM_REQUESTS
    assert all(reason == "length" for _, _, _, reason in results.values())
    assert engine.stats()["num_errors"] == errors_before
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], "KV blocks leaked"
    ok = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("aurora_http_requests_total{") and 'status="200"' in line and "/v1/" in line)
    assert ok == NUM_REQUESTS

    latencies = sorted(r[0] for r in results.values())
    ttfts = sorted(r[1] for r in results.values() if r[1] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"\nload: {NUM_REQUESTS} streamed requests, {NUM_CLIENTS} clients, max_tokens {MAX_TOKENS}: "
          f"{wall:.2f}s wall, {NUM_REQUESTS * MAX_TOKENS / wall:.0f} tok/s | latency p50 {pct(latencies, .5) * 1e3:.0f} ms "
          f"p99 {pct(latencies, .99) * 1e3:.0f} ms (mean {statistics.mean(latencies) * 1e3:.0f}) | "
          f"TTFT p50 {pct(ttfts, .5) * 1e3:.0f} ms p99 {pct(ttfts, .99) * 1e3:.0f} ms")

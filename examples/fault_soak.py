"""Fault-injection soak: many concurrent streaming clients on loopback while faults are injected.

Faults (all injected from outside the engine, by wrapping objects, no test-only code paths):
  nan_candidate      the trainer's candidate head turns NaN after a step (must never be published)
  bad_swap           the serving draft's live slot turns NaN at a step boundary (a corrupt swap)
  trainer_exception  the trainer's next step raises (training stops; serving must not notice)
  proposer_exception the draft raises whenever one of the POISON requests is in the batch
  disconnects        some clients drop their stream after a few events
  kv_pressure        a KV pool smaller than the running requests need (preemption + recompute)
Checked afterwards: no request lost or hung, KV blocks back to their start, greedy outputs equal
a no-fault reference, /metrics counters agree with what the clients saw.

    python examples/fault_soak.py [--model smollm2-135m] [--requests 320] [--clients 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass

import aiohttp
import torch

from aurora import Engine, EngineConfig, SamplingParams, ServerConfig
from aurora.server import ServerThread

FAULT_AT = {"nan_candidate": 0.1, "bad_swap": 0.25, "trainer_exception": 0.6}   # fraction of requests done
POISON_EVERY = 16
DISCONNECT_RATE = 0.12


@dataclass
class Request:
    index: int
    chat: bool
    greedy: bool
    prompt: str
    max_tokens: int
    poisoned: bool = False
    disconnect_after: int | None = None     # events read before dropping the connection

    def path_and_body(self) -> tuple[str, dict]:
        body = {"max_tokens": self.max_tokens, "ignore_eos": True, "stream": True,
                "temperature": 0 if self.greedy else 0.8, "seed": self.index}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
            return "/v1/chat/completions", body
        body["prompt"] = self.prompt
        return "/v1/completions", body


@dataclass
class Outcome:
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None
    done: bool = False                       # saw [DONE]
    disconnected: bool = False
    hung: bool = False


def make_requests(n: int, max_tokens: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        chat = i % 3 == 1
        poisoned = not chat and i % POISON_EVERY == 5
        topic = ["the sea", "prime numbers", "a red fox", "Python lists", "the moon"][i % 5]
        prompt = f"{'POISON ' if poisoned else ''}Request {i}: tell me about {topic}. " * (1 + i % 3)
        reqs.append(Request(i, chat, greedy=i % 2 == 0, prompt=prompt, max_tokens=max_tokens - i % 5,
                            poisoned=poisoned,
                            disconnect_after=rng.randint(1, 4) if rng.random() < DISCONNECT_RATE else None))
    return reqs


def prompt_ids(engine: Engine, req: Request) -> list[int]:
    if req.chat:
        return engine.chat_prompt([{"role": "user", "content": req.prompt}])
    return engine.encode_prompt(req.prompt)


def greedy_reference(model: str, reqs: list[Request]) -> dict[int, str]:
    """Texts of the greedy requests from a plain engine with no faults, no draft, no pressure."""
    with Engine(EngineConfig(model=model, draft="none", online=False, dtype="float32")) as ref:
        todo = [r for r in reqs if r.greedy]
        outs = ref.generate_batch([prompt_ids(ref, r) for r in todo],
                                  [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
                                   for r in todo], timeout=3600)
    return {r.index: o.text for r, o in zip(todo, outs)}


class Faults:
    """Installs the fault wrappers on `engine`; `arm(name)` fires one at the next chance."""

    def __init__(self, engine: Engine, poisoned_ids: set[tuple[int, ...]]):
        self.engine, self.poisoned_ids = engine, poisoned_ids
        self.armed: set[str] = set()
        self.fired: dict[str, int] = {k: 0 for k in (*FAULT_AT, "proposer_exception")}
        self._lock = threading.Lock()
        flywheel = engine.flywheel
        self.learned = getattr(engine.proposer, "learned", None) or engine.proposer
        inner_propose = engine.proposer.propose

        def propose(seqs, ctx):
            if any(tuple(s.prompt_ids) in self.poisoned_ids for s in seqs):
                self.fired["proposer_exception"] += 1
                raise RuntimeError("injected: proposer exception for a poisoned sequence")
            return inner_propose(seqs, ctx)
        engine.proposer.propose = propose
        engine.before_step.append(self._at_boundary)
        if flywheel is not None:
            inner_step = flywheel.trainer.train_step

            def train_step():
                if self._take("trainer_exception"):
                    raise RuntimeError("injected: trainer exception")
                stepped = inner_step()
                if stepped and self._take("nan_candidate"):
                    with torch.no_grad():
                        next(flywheel.trainer.head.parameters()).fill_(float("nan"))
                return stepped
            flywheel.trainer.train_step = train_step

    def arm(self, name: str) -> None:
        with self._lock:
            self.armed.add(name)

    def _take(self, name: str) -> bool:
        with self._lock:
            if name not in self.armed:
                return False
            self.armed.discard(name)
            self.fired[name] += 1
            return True

    def _at_boundary(self) -> None:            # engine thread: the only reader of the live slot
        if self._take("bad_swap") and hasattr(self.learned, "head"):
            with torch.no_grad():
                for p in self.learned.head.parameters():
                    p.fill_(float("nan"))


async def _one(session: aiohttp.ClientSession, url: str, req: Request, timeout: float) -> Outcome:
    out, path_body = Outcome(), req.path_and_body()
    events = 0
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + path_body[0], json=path_body[1]) as resp:
                out.status = resp.status
                if resp.status != 200:
                    out.error = (await resp.json()).get("error")
                    return out
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[len(b"data: "):].strip()
                    if payload == b"[DONE]":
                        out.done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        out.error = event["error"]
                        continue
                    for choice in event.get("choices", []):
                        piece = choice["delta"].get("content") if req.chat else choice["text"]
                        out.text += piece or ""
                        out.finish_reason = choice["finish_reason"] or out.finish_reason
                    events += 1
                    if req.disconnect_after is not None and events >= req.disconnect_after:
                        out.disconnected = True
                        resp.close()                                  # drop the connection mid-stream
                        return out
    except TimeoutError:
        out.hung = True
    except aiohttp.ClientError as exc:
        out.error = {"message": str(exc), "code": "client_error"}
    return out


def _metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def wait_idle(engine: Engine, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def run_soak(engine: Engine, reqs: list[Request], reference: dict[int, str], clients: int = 32,
             timeout: float = 120.0) -> dict:
    """Serve `reqs` from `clients` concurrent streaming clients with faults injected; return a report."""
    poisoned = {tuple(prompt_ids(engine, r)) for r in reqs if r.poisoned}
    faults = Faults(engine, poisoned)
    before = engine.stats()
    outcomes: dict[int, Outcome] = {}
    with ServerThread(engine, ServerConfig(port=0, max_concurrent=clients * 2)) as server:
        async def client(session, queue):
            while not queue.empty():
                req = queue.get_nowait()
                outcomes[req.index] = await _one(session, server.url, req, timeout)

        flywheel = engine.flywheel

        def ready(name: str) -> bool:
            # the trainer dies only once the NaN candidate was caught: on a fast run the two
            # trainer faults would otherwise race (the trainer may get no unit in between)
            return name != "trainer_exception" or flywheel is None or flywheel.nonfinite_restores >= 1

        async def scheduler():
            """Arm each fault at its share of requests done; a trainer fault still pending when
            the clients are done is armed in the idle tail, where the trainer keeps working."""
            pending = dict(FAULT_AT)
            while pending:
                for name, at in list(pending.items()):
                    if len(outcomes) >= at * len(reqs) and ready(name):
                        faults.arm(name)
                        del pending[name]
                await asyncio.sleep(0.02)
            while flywheel is not None and faults.armed & {"nan_candidate", "trainer_exception"}:
                await asyncio.sleep(0.02)                  # armed: fires at the trainer's next unit
            while flywheel is not None and faults.fired["trainer_exception"] and flywheel.stats()["alive"]:
                await asyncio.sleep(0.02)                  # the crashed trainer's thread winds down

        async def main():
            queue: asyncio.Queue = asyncio.Queue()
            for r in reqs:
                queue.put_nowait(r)
            conn = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(connector=conn) as session:
                sched = asyncio.ensure_future(scheduler())
                await asyncio.gather(*(client(session, queue) for _ in range(clients)))
                try:
                    await asyncio.wait_for(sched, timeout)
                except TimeoutError:                       # reported: `faults_fired` shows what did not
                    pass
                await asyncio.to_thread(wait_idle, engine)
                async with session.get(server.url + "/metrics") as resp:
                    return _metrics(await resp.text())

        t0 = time.perf_counter()
        metrics = asyncio.run(main())
        wall = time.perf_counter() - t0
    after = wait_idle(engine)
    return report(reqs, outcomes, reference, metrics, before, after, faults, wall)


def report(reqs, outcomes, reference, metrics, before, after, faults, wall) -> dict:
    completed = [r for r in reqs if outcomes[r.index].done and outcomes[r.index].error is None]
    errors = [r for r in reqs if outcomes[r.index].error is not None]
    disconnected = [r for r in reqs if outcomes[r.index].disconnected]
    hung = [r for r in reqs if outcomes[r.index].hung]
    lost = [r for r in reqs if r.index not in outcomes or not (outcomes[r.index].done or outcomes[r.index].disconnected
                                                                or outcomes[r.index].error is not None)]
    greedy_done = [r for r in completed if r.greedy]
    mismatches = [r.index for r in greedy_done if outcomes[r.index].text != reference[r.index]]
    trainer = after.get("trainer") or {}
    finished_length = metrics.get('aurora_http_generations_finished_total{finish_reason="length"}', 0.0)
    def http(status: str) -> float:
        return sum(v for k, v in metrics.items()
                   if k.startswith("aurora_http_requests_total{") and f'status="{status}"' in k and "/v1/" in k)
    return {
        "requests": len(reqs), "completed": len(completed), "disconnected": len(disconnected),
        "errors": len(errors), "error_messages": sorted({str(outcomes[r.index].error)[:120] for r in errors}),
        "hung": len(hung), "lost": len(lost),
        "bad_finish_reasons": sum(outcomes[r.index].finish_reason != "length" for r in completed),
        "leaked_blocks": after["kv_blocks_total"] - after["kv_blocks_free"],
        "kv_blocks_total": after["kv_blocks_total"],
        "greedy_checked": len(greedy_done), "greedy_mismatches": mismatches,
        "faults_fired": dict(faults.fired),
        "poisoned_requests": sum(r.poisoned for r in reqs),
        "preemptions": after["num_preemptions"] - before["num_preemptions"],
        "draft_failures": after.get("draft_failures", 0) - before.get("draft_failures", 0),
        "draft_switch_offs": after.get("draft_switch_offs", 0) - before.get("draft_switch_offs", 0),
        "engine_errors": after["num_errors"] - before["num_errors"],
        "engine_requests": after["num_requests"] - before["num_requests"],
        "trainer": {k: trainer.get(k) for k in ("steps", "swaps", "nonfinite_restores", "error", "alive")},
        "metrics": {"http_200": http("200"), "http_499": http("499"), "finished_length": finished_length,
                    "cancelled": metrics.get("aurora_http_generations_cancelled_total", 0.0),
                    "draft_failures": metrics.get("aurora_draft_failures_total"),
                    "engine_errors": metrics.get("aurora_engine_errors_total")},
        "wall_s": round(wall, 1),
    }


def build_engine(model: str, kv_tokens: int, max_batch: int = 16) -> Engine:
    return Engine(EngineConfig(model=model, draft="eagle+ngram", online=True, dtype="float32",
                               kv_tokens=kv_tokens, max_batch=max_batch))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-tokens", type=int, default=512, help="KV pool (tokens); small = pressure")
    args = ap.parse_args()
    reqs = make_requests(args.requests, args.max_tokens)
    reference = greedy_reference(args.model, reqs)
    with build_engine(args.model, args.kv_tokens) as engine:
        result = run_soak(engine, reqs, reference, clients=args.clients, timeout=600)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

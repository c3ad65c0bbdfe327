"""Trained tokens per served request and per trainer CPU-second (the flywheel's training yield).

Serves real requests back to back with the online `eagle+ngram` draft, then leaves the
engine idle for a while (idle compute counts: the trainer should use it), and reports
optimizer steps, rows trained, rows per request and rows per trainer CPU-second. Trainer
CPU-seconds: process CPU time during the idle phase (only the trainer computes then), and
an estimate over the whole run from the trainer thread's own CPU time inside each step.

    python examples/trained_tokens.py [--requests 12] [--max-tokens 64] [--idle 20]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams
from aurora.workloads import load_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds idle after the last request")
    args = ap.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [p.text[:600] for p in load_domain("code", args.requests, seed=11)]
    eng = Engine(EngineConfig(model=args.model, draft="eagle+ngram", online=True))
    trainer = eng.flywheel.trainer
    cpu = {"s": 0.0, "wall": 0.0}
    real_step = trainer.train_step

    def timed_step():                       # runs on the trainer thread
        c0, w0 = time.thread_time(), time.perf_counter()
        ok = real_step()
        cpu["s"] += (time.thread_time() - c0) * torch.get_num_threads()
        cpu["wall"] += time.perf_counter() - w0
        return ok
    trainer.train_step = timed_step
    t0 = time.perf_counter()
    tokens = 0
    for p in prompts:
        tokens += len(eng.generate_batch([p], params)[0].token_ids)
    serve_s = time.perf_counter() - t0
    at_serve_end = dict(eng.stats()["trainer"])
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(args.idle)                   # idle engine: all process CPU is the trainer's
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    st = eng.stats()["trainer"]
    idle_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    idle_tokens = st["tokens_trained"] - at_serve_end["tokens_trained"]
    eng.close()
    n = len(prompts)
    out = {
        "requests": n, "generated_tokens": tokens, "serve_s": round(serve_s, 1),
        "serve_tok_s": round(tokens / serve_s, 2), "idle_s": args.idle,
        "steps_while_serving": at_serve_end["steps"], "tokens_trained_while_serving": at_serve_end["tokens_trained"],
        "steps": st["steps"], "tokens_trained": st["tokens_trained"],
        "tokens_trained_per_request": round(st["tokens_trained"] / n, 1),
        "trainer_cpu_s": round(cpu["s"], 1), "trainer_step_wall_s": round(cpu["wall"], 1),
        "tokens_trained_per_cpu_s": round(st["tokens_trained"] / max(cpu["s"], 1e-9), 1),
        "idle_tokens_trained": idle_tokens, "idle_process_cpu_s": round(idle_cpu, 1),
        "idle_tokens_trained_per_cpu_s": round(idle_tokens / max(idle_cpu, 1e-9), 1),
        "swaps": st["swaps"], "rollbacks": st["rollbacks"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Serving speed with the online trainer running vs paused, and vs an ngram-only engine.

Same process, same prompts, greedy, batch 1; requests alternate between the three
configurations (paused / running / ngram) and medians are reported.

    python examples/trainer_overhead.py [--model smollm2-135m] [--requests 9] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from aurora import Engine, EngineConfig, SamplingParams
from aurora.workloads import load_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [p.text[:600] for p in load_domain("code", args.requests + 2, seed=5)]
    online = Engine(EngineConfig(model=args.model, draft="eagle+ngram", online=True))
    ngram = Engine(EngineConfig(model=args.model, draft="ngram", online=False, threads=online.serve_threads()))
    rates = {"ngram": [], "online, trainer paused": [], "online, trainer running": []}

    def run(engine, prompt):
        t = time.perf_counter()
        out = engine.generate_batch([prompt], params)[0]
        return len(out.token_ids) / (time.perf_counter() - t), out.stats["accepted_length"]

    for p in prompts[:2]:                                   # warm-up (and first traces)
        run(online, p), run(ngram, p)
    taus = {k: [] for k in rates}
    for p in prompts[2:]:
        for name in rates:
            # the trainer only trains while it is measured: while the ngram engine serves, the online
            # engine looks idle to its own trainer, which would then compete with the other engine
            (online.flywheel.resume if name == "online, trainer running" else online.flywheel.pause)()
            time.sleep(0.2)
            r, tau = run(ngram if name == "ngram" else online, p)
            rates[name].append(r)
            taus[name].append(tau)
    out = {k: {"tok_s": statistics.median(v), "tau": statistics.mean(taus[k])} for k, v in rates.items()}
    out["trainer"] = {k: online.stats()["trainer"][k] for k in ("steps", "swaps", "loss")}
    print(json.dumps(out, indent=2))
    online.close()
    ngram.close()


if __name__ == "__main__":
    main()

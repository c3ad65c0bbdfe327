"""Does the compiled target step recompile in steady serving? Counted over a long real run.

An engine with `compile="on"` compiles its graphs at start-up (`warmup`); this script then
serves `--requests` real requests (code, finance, chat; prompt lengths as they come) in waves
of 1 to `--max-wave` concurrent requests with the default draft, and counts the graphs dynamo
compiled after start-up (`aurora.models.compiled.num_graphs`). The target: 0.

    python examples/compile_recompiles.py [--requests 100] [--quantize int4] [--draft eagle+ngram]
"""
from __future__ import annotations

import argparse
import json
import random
import time

from aurora import Engine, EngineConfig, SamplingParams
from aurora.models.compiled import num_graphs
from aurora.workloads import domain_shift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-wave", type=int, default=4)
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--draft", default=EngineConfig.draft)
    ap.add_argument("--online", action="store_true", help="train the learned draft while serving")
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = domain_shift(["code", "finance", "chat"], -(-args.requests // 3), seed=7, max_chars=1500)
    prompts = [p.text for p in prompts][:args.requests]
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model=args.model, draft=args.draft, online=args.online, compile="on",
                              quantize=args.quantize, max_batch=max(4, args.max_wave)))
    startup_s = time.perf_counter() - t0
    graphs_startup = num_graphs()
    served, waves, tokens, per_wave = 0, 0, 0, []
    t1 = time.perf_counter()
    try:
        while served < len(prompts):
            wave = prompts[served:served + rng.randint(1, args.max_wave)]
            params = [SamplingParams(max_tokens=rng.randint(8, args.max_tokens), temperature=rng.choice([0, 0.7]),
                                     top_p=0.9, seed=served + i) for i in range(len(wave))]
            outs = eng.generate_batch(wave, params)
            tokens += sum(len(o.token_ids) for o in outs)
            served += len(wave)
            waves += 1
            per_wave.append(num_graphs() - graphs_startup)
            if waves % 10 == 0:
                print(f"  {served}/{len(prompts)} requests, graphs compiled since start-up: {per_wave[-1]}", flush=True)
    finally:
        stats = eng.stats()
        eng.close()
    print(json.dumps({"requests": served, "waves": waves, "tokens": tokens, "draft": args.draft,
                      "quantize": args.quantize, "startup_s": round(startup_s, 1),
                      "graphs_at_startup": graphs_startup, "graphs_compiled_while_serving": num_graphs() - graphs_startup,
                      "first_wave_with_a_recompile": next((i + 1 for i, g in enumerate(per_wave) if g), None),
                      "serve_s": round(time.perf_counter() - t1, 1),
                      "accepted_length": stats.get("accepted_length")}, indent=1))


if __name__ == "__main__":
    main()

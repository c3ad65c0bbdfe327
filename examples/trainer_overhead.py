"""Serving speed with the online trainer running vs paused, and vs an ngram-only engine.

Same process, same prompts, greedy, batch 1; requests alternate between the three
configurations (paused / running / ngram) and medians are reported.

    python examples/trainer_overhead.py [--model smollm2-135m] [--requests 9] [--max-tokens 64]
        [--checkpoint DIR] [--trainer idle_grace_s=0 min_busy_share=0.15 ...]

`--checkpoint`: the online draft starts from a saved one (e.g. the day-0 draft). `--trainer`:
TrainerConfig fields, e.g. `idle_grace_s=0 min_busy_share=0.15` for the trainer before session 12
(gaps between back-to-back requests taken as idle time, a fixed 15 % busy share).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.workloads import load_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--checkpoint", default=None, help="saved draft the online draft starts from")
    ap.add_argument("--trainer", nargs="*", default=[], metavar="FIELD=VALUE", help="TrainerConfig overrides")
    args = ap.parse_args()
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    overrides = {}
    for item in args.trainer:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            ap.error(f"--trainer {item!r}: expected FIELD=VALUE with a TrainerConfig field")
        kind = type(getattr(TrainerConfig(), key))
        overrides[key] = value.lower() in ("1", "true", "on", "yes") if kind is bool else kind(value)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [p.text[:600] for p in load_domain("code", args.requests + 2, seed=5)]
    draft = f"eagle:{args.checkpoint}+ngram" if args.checkpoint else "eagle+ngram"
    # each prompt is served more than once per engine: no prefix cache, every prefill is timed
    online = Engine(EngineConfig(model=args.model, draft=draft, online=True, trainer=TrainerConfig(**overrides),
                                 prefix_cache=False))
    ngram = Engine(EngineConfig(model=args.model, draft="ngram", online=False, threads=online.serve_threads(),
                                prefix_cache=False))
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
            # back to back: the request follows the toggle at once (a pause to settle comes first)
            online.flywheel.pause(wait=True)
            time.sleep(0.2)
            if name == "online, trainer running":
                online.flywheel.resume()
            r, tau = run(ngram if name == "ngram" else online, p)
            rates[name].append(r)
            taus[name].append(tau)
    out = {k: {"tok_s": statistics.median(v), "tau": statistics.mean(taus[k])} for k, v in rates.items()}
    out["trainer"] = {k: online.stats()["trainer"][k]
                      for k in ("steps", "swaps", "loss", "busy_fraction", "busy_share", "share_cuts")}
    out["trainer_config"] = overrides
    print(json.dumps(out, indent=2))
    online.close()
    ngram.close()


if __name__ == "__main__":
    main()

"""Measure the speculative cost model on the target: verify cost beta(k) and draft cost c.

beta(k) = time of one target forward scoring k draft nodes (chain) after a prefix / time of
one plain decode forward; c = time of one draft proposal step (eagle head, chain of depth 1)
/ one plain decode forward. Medians of interleaved repeats after warm-up, one process.

    python examples/spec_costs.py [--model smollm2-135m] [--prefix 200] [--repeats 15]
                                  [--compile on] [--quantize int4]   # the compiled / quantized target
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from aurora import Engine, EngineConfig, SpecConfig
from aurora.engine.sequence import Sequence
from aurora.engine.step import build_step
from aurora.engine.tree import DraftTree
from aurora.drafts import ProposeContext
from aurora.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", default="off", help="EngineConfig.compile: off | on | static")
    ap.add_argument("--quantize", default="none", help="EngineConfig.quantize: none | int8 | int4")
    args = ap.parse_args()
    eng = Engine(EngineConfig(model=args.model, draft="eagle", online=False, dtype="auto", compile=args.compile,
                              quantize=args.quantize, max_batch=1, threads=args.threads,
                              prefix_cache=False))
    # on the engine's compute thread: a second OpenMP pool in the process slows every step (engine/worker.py)
    out = eng.run_on_worker(measure, eng, args)
    print(json.dumps(out, indent=2))
    ks = list(out["beta"])
    print("\n| k | " + " | ".join(str(k) for k in ks) + " |\n|---|" + "---|" * len(ks))
    print("| β(k) | " + " | ".join(f"{out['beta'][k]:.2f}" for k in ks) + " |")
    print(f"\ndecode step {out['decode_ms']:.1f} ms; draft cost c = {out['c_draft_step']:.3f} "
          f"(steady, cached context) / {out['c_draft_cold']:.3f} (cold, 48-row window)")
    eng.close()


def measure(eng: Engine, args) -> dict:
    torch.set_num_threads(args.threads or eng.serve_threads())
    runner, cache = eng.runner, eng.runner.cache
    ids = [(i * 7919) % 5000 + 100 for i in range(args.prefix)]
    seq = Sequence("cost", ids, SamplingParams(temperature=0), None)
    ks = [int(k) for k in args.ks.split(",")]
    seq.block_ids = cache.allocator.allocate((args.prefix + max(ks) + 32) // cache.block_size + 1)
    batch, _ = build_step([seq], [None], cache.block_size, runner.device)
    result = runner.forward(batch)                      # prefill
    seq.num_cached = args.prefix
    seq.token_ids.append(int(result.logits[-1].argmax()))
    seq.features = result.features[-64:]

    def time_forward(tree):
        b, _ = build_step([seq], [tree], cache.block_size, runner.device)
        t = time.perf_counter()
        runner.forward(b)
        return time.perf_counter() - t

    proposer = eng.proposer
    spec = SpecConfig(shape="chain", depth=1)

    def time_draft():
        seq.draft_state.clear()                         # a fresh context each time is the worst case
        t = time.perf_counter()
        proposer.propose([seq], ProposeContext(spec, runner.vocab_size))
        return time.perf_counter() - t

    def time_draft_step():                              # steady state: cached context K/V
        t = time.perf_counter()
        proposer.propose([seq], ProposeContext(spec, runner.vocab_size))
        return time.perf_counter() - t

    samples = {k: [] for k in [0, *ks]}
    draft, draft_step = [], []
    for r in range(args.repeats + 3):
        for k in [0, *ks]:
            dt = time_forward(DraftTree.chain([5] * k) if k else None)
            if r >= 3:
                samples[k].append(dt)
        d, s = time_draft(), time_draft_step()
        if r >= 3:
            draft.append(d)
            draft_step.append(s)
    base = statistics.median(samples[0])
    out = {"model": args.model, "compile": args.compile, "quantize": args.quantize, "prefix": args.prefix, "threads": torch.get_num_threads(),
           "decode_ms": 1000 * base,
           "beta": {k: statistics.median(samples[k]) / base for k in ks},
           "c_draft_step": statistics.median(draft_step) / base,
           "c_draft_cold": statistics.median(draft) / base}
    return out


if __name__ == "__main__":
    main()

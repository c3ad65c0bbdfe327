"""Target-only decode at batch 1: eager vs compiled vs quantized target steps, same process.

Each variant is a TargetRunner over its own copy of the weights; one decode step (one new
token after a `--prefix`-token context) is timed per variant in turn (interleaved), medians
after warm-up. Compilation happens in the warm-up (first call per variant, counted); the
timed loop then reports how many graphs were compiled during it (should be 0).

    python examples/compile_bench.py [--model smollm2-135m] [--variants off/none,on/none,on/int4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from aurora.models.compiled import num_graphs, synthetic_batch
from aurora.models.loader import load_model, resolve_dtype
from aurora.models.runner import TargetRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default="off/none,off/int4,on/none,on/int4",
                    help="comma list of compile/quantize pairs")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print a torch profile of each variant's step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    runners, compile_s = {}, {}
    for v in args.variants.split(","):
        comp, quant = v.split("/")
        model, _ = load_model(args.model, dtype, device)
        runners[v] = TargetRunner(model, (args.prefix + 64) // 16 + 8, 16, compile=comp, quantize=quant)
    # Context that grows by one token per step, as in serving: the prefix length changes every step.
    batches = {}
    for v, r in runners.items():
        t0 = time.perf_counter()
        for n in (args.prefix, args.prefix + 1):                      # compiles the decode graph
            batch, blocks = synthetic_batch(r.cache, [1], n, r.device)
            r.forward(batch)
            r.cache.allocator.free(blocks)
        compile_s[v] = time.perf_counter() - t0
        print(f"{v}: warm-up (incl. compile) {compile_s[v]:.1f} s", flush=True)
    graphs_before = num_graphs()
    samples = {v: [] for v in runners}
    for step in range(args.steps):
        for v, r in runners.items():
            batch, blocks = synthetic_batch(r.cache, [1], args.prefix + step, r.device)
            t = time.perf_counter()
            r.forward(batch)
            samples[v].append(time.perf_counter() - t)
            r.cache.allocator.free(blocks)
    base = statistics.median(samples[next(iter(runners))])
    out = {"model": args.model, "dtype": str(dtype), "threads": args.threads, "prefix": args.prefix,
           "steps": args.steps, "graphs_compiled_during_timed_steps": num_graphs() - graphs_before,
           "variants": {v: {"decode_ms": 1000 * statistics.median(s), "tok_s": 1 / statistics.median(s),
                            "speedup": base / statistics.median(s), "warmup_s": compile_s[v]}
                        for v, s in samples.items()}}
    print(json.dumps(out, indent=2))
    print("\n| target step (compile/quantize) | decode ms | tok/s | vs first |\n|---|---|---|---|")
    for v, d in out["variants"].items():
        print(f"| {v} | {d['decode_ms']:.1f} | {d['tok_s']:.1f} | {d['speedup']:.2f}x |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for v, r in runners.items():
            batch, blocks = synthetic_batch(r.cache, [1], args.prefix, r.device)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(5):
                    r.forward(batch)
            r.cache.allocator.free(blocks)
            print(f"\n== {v}\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

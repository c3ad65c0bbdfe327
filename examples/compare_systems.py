"""Run the side-by-side benchmark from Python and read the figures back: the same
thing `aurora bench` does, for notebooks and scripts.

    python examples/compare_systems.py [--model tiny-llama] [--out bench_out]
"""
from __future__ import annotations

import argparse

from aurora.bench.report import format_table
from aurora.bench.run import BenchConfig, run_bench, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    cfg = BenchConfig(model=args.model, systems=("hf", "hf-lookup", "none", "ngram"), per_domain=2,
                      max_tokens=24)
    results = run_bench(cfg)
    rows = [[name, s["tokens_per_s"], s["speedup"], s["tau"], s["exact"]] for name, s in results["systems"].items()]
    print(format_table(("system", "tok/s", "speedup", "τ", "exact"), rows))
    print(write_outputs(results, args.out))


if __name__ == "__main__":
    main()

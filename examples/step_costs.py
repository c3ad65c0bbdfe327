"""CPU time per target forward and per token for each system, on one torch thread.

Process CPU time barely moves when other jobs share the machine, unlike wall time,
so this attributes cost on a busy box: HF decode vs Aurora's target step (runner
overhead), the verify cost of a chain (beta), and the draft's cost per step (c).

    python examples/step_costs.py [--model smollm2-135m] [--per-domain 1] [--max-tokens 48]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-domain", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--drafts", default="none,ngram,eagle+ngram")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from aurora.bench.run import default_max_chars, encode, quiet_transformers, stop_ids
    from aurora.bench.systems import (
        AuroraSystem,
        BuildOptions,
        build_system,
        load_tokenizer,
    )
    from aurora.config import EngineConfig
    from aurora.types import SamplingParams
    from aurora.workloads import domain_shift

    quiet_transformers()
    tok = load_tokenizer(args.model)
    prompts = domain_shift(["code", "chat"], args.per_domain, max_chars=default_max_chars(args.model))
    ids = [encode(tok, p) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=stop_ids(tok, args.model))

    def measure(name, system):
        system.generate(ids[0], params)                          # warm-up
        cpu = forwards = tokens = 0
        for x in ids:
            c0 = time.process_time()
            out = system.generate(x, params)
            cpu += time.process_time() - c0
            forwards += (out.num_forwards or 0) + 1              # + the prefill
            tokens += len(out.token_ids)
        print(f"{name:12s} cpu/forward {1000 * cpu / forwards:6.1f} ms  cpu/token {1000 * cpu / tokens:6.1f} ms  "
              f"tau {(tokens - len(ids)) / max(1, forwards - len(ids)):.2f}", flush=True)
        system.close()

    opts = BuildOptions(model=args.model, dtype="float32", device="cpu")
    for name in ("hf", "hf-lookup"):
        measure(name, build_system(name, opts))
    for draft in args.drafts.split(","):
        config = EngineConfig(model=args.model, draft=draft, online=False, threads=1, device="cpu",
                              dtype="float32", kv_tokens=8192, max_batch=1, prefix_cache=False)
        measure(draft, AuroraSystem(draft, config))


if __name__ == "__main__":
    main()

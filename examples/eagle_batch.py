"""Batched EAGLE proposals: draft time per step and tok/s at 1, 4 and 16 streams, the proposer
drafting all sequences of a step together vs one sequence at a time (the same code called per
sequence, which is what the proposer did before it batched). One engine, `eagle` draft frozen
(online=False), greedy, fresh prompts per cell, interleaved, medians of `--repeats` rounds.

    python examples/eagle_batch.py [--conc 1,4,16] [--max-tokens 24] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams
from aurora.workloads import load_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conc", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    eng = Engine(EngineConfig(model=args.model, draft="eagle", online=False, kv_tokens=16384, prefix_cache=False))
    torch.set_num_threads(eng.serve_threads())
    proposer = eng.proposer
    batched = proposer.propose

    def per_sequence(seqs, ctx):
        return [batched([seq], ctx)[0] for seq in seqs]

    texts = [p.text[:400] for p in load_domain("chat", 2 + 2 * args.repeats * sum(concs), seed=11)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    eng.generate_batch(texts[:2], params)                                 # warm-up
    texts = texts[2:]
    res: dict[tuple, list] = {}
    for c in concs:
        for _ in range(args.repeats):
            for mode, fn in (("per-sequence", per_sequence), ("batched", batched)):
                proposer.propose = fn
                prompts, texts = texts[:c], texts[c:]
                s0, t = eng.stats(), time.perf_counter()
                eng.generate_batch(prompts, params)
                wall, s1 = time.perf_counter() - t, eng.stats()
                steps = max(1, s1["num_steps"] - s0["num_steps"])
                res.setdefault((c, mode), []).append((1000 * (s1["draft_s"] - s0["draft_s"]) / steps,
                                                      c * args.max_tokens / wall))
    proposer.propose = batched
    print("| streams | draft ms/step, per sequence | draft ms/step, batched | tok/s, per sequence | tok/s, batched |")
    print("|---|---|---|---|---|")
    for c in concs:
        d0, t0 = (statistics.median(x[i] for x in res[(c, "per-sequence")]) for i in (0, 1))
        d1, t1 = (statistics.median(x[i] for x in res[(c, "batched")]) for i in (0, 1))
        print(f"| {c} | {d0:.1f} | {d1:.1f} | {t0:.1f} | {t1:.1f} |")
    eng.close()


if __name__ == "__main__":
    main()

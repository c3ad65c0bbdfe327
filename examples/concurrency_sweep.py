"""Throughput under load: concurrent streams x draft x decoding mode, beside transformers.

For each concurrency (1, 4, 16 streams) and mode (greedy; temperature 0.7 with top_p 0.9),
every Aurora configuration serves the same prompts (code and chat, one wave of `c` requests),
and transformers `generate` runs them as one left-padded batch on the same weights. Drafts
use the adaptive policy unless suffixed ":fixed". One process, interleaved, each engine warmed
up on other prompts first (the adaptive policy and the cost model learn online from that).

    python examples/concurrency_sweep.py [--conc 1,4,16] [--max-tokens 32]
        [--drafts none,ngram,eagle+ngram,eagle+ngram:fixed]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.workloads import load_domain

MODES = {"greedy": dict(temperature=0.0), "T0.7/p0.9": dict(temperature=0.7, top_p=0.9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conc", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--drafts", default="none,ngram,eagle+ngram,eagle+ngram:fixed")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    n = max(concs)
    texts = [p.text[:500] for p in load_domain("code", (n + 1) // 2, seed=7) + load_domain("chat", n // 2 + 4, seed=7)]
    warm_texts, texts = texts[n:n + 4], texts[:n]
    engines = {}
    for name in args.drafts.split(","):
        draft, _, fixed = name.partition(":")
        engines[name] = Engine(EngineConfig(model=args.model, draft=draft, online=False, kv_tokens=8192,
                                            spec=SpecConfig(adaptive=fixed != "fixed")))
    first = next(iter(engines.values()))
    torch.set_num_threads(first.serve_threads())
    tok, model = first.tokenizer, first.runner.model
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    warm = [tok.encode(t, add_special_tokens=False) for t in warm_texts]

    def aurora(eng, c, mode):
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, seed=1, **MODES[mode])
        t = time.perf_counter()
        outs = eng.generate_batch(ids[:c], params)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    def hf(c, mode):
        model.config._attn_implementation = "sdpa"
        try:
            width = max(len(x) for x in ids[:c])
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids[:c]])
            att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids[:c]])
            m = MODES[mode]
            kw = dict(do_sample=True, temperature=m["temperature"], top_p=m["top_p"], top_k=0) if m["temperature"] \
                else dict(do_sample=False)
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(inp, attention_mask=att, max_new_tokens=args.max_tokens,
                               min_new_tokens=args.max_tokens, pad_token_id=pad, **kw)
            return c * args.max_tokens / (time.perf_counter() - t)
        finally:
            model.config._attn_implementation = "aurora_paged"

    for eng in engines.values():                       # warm-up: kernels, allocator, online estimates
        for mode in args.modes.split(","):
            eng.generate_batch(warm, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **MODES[mode]))
    hf(1, "greedy")
    rows = []
    for c in concs:
        for mode in args.modes.split(","):
            row = {"streams": c, "mode": mode, "hf": hf(c, mode)}
            for name, eng in engines.items():
                row[name] = aurora(eng, c, mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
    policy = {name: {k: v for k, v in eng.stats().items() if k.startswith("policy_")} for name, eng in engines.items()}
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                      "policy": policy}, indent=1, default=str))
    names = list(engines)
    print("\n| streams | mode | transformers tok/s | " + " | ".join(f"{n} tok/s" for n in names)
          + " | " + " | ".join(f"{n} / none" for n in names if n != "none") + " | none / transformers |")
    print("|---" * (3 + 2 * len(names)) + "|")
    for r in rows:
        base = r.get("none")
        ratios = [f"{r[n] / base:.2f}×" if base else "-" for n in names if n != "none"]
        print(f"| {r['streams']} | {r['mode']} | {r['hf']:.1f} | " + " | ".join(f"{r[n]:.1f}" for n in names)
              + " | " + " | ".join(ratios) + f" | {(base or 0) / r['hf']:.2f}× |")
    for eng in engines.values():
        eng.close()


if __name__ == "__main__":
    main()

"""Target-only throughput, Aurora vs transformers `generate`, at batch 1 and batch N.

Same weights, same prompts, greedy, same max tokens, one process; each measurement is the
median of interleaved repeats after a warm-up. transformers runs batch N with left padding, on
the engine's compute thread (same thread, same OpenMP pool).
`--compile on` serves Aurora through the compiled target step (same bf16 weights; compiling
takes minutes and happens before anything is timed); transformers stays eager `generate`.

    python examples/batch_throughput.py [--model smollm2-135m] [--batch 8] [--max-tokens 64] [--compile on]
                                        [--packed-linears off]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams
from aurora.models.packed_linear import plain_linears
from aurora.models.runner import set_attn
from aurora.workloads import load_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", default="off", choices=("off", "on"))
    ap.add_argument("--packed-linears", default="on", choices=("off", "on"),
                    help="off: Aurora's linears take F.linear (the A/B of models/packed_linear.py)")
    args = ap.parse_args()
    eng = Engine(EngineConfig(model=args.model, draft="none", online=False, dtype=args.dtype,
                              compile=args.compile, prefix_cache=False,
                              packed_linears=args.packed_linears == "on"))   # repeats the prompts: measure prefill
    torch.set_num_threads(eng.serve_threads())
    tok, model = eng.tokenizer, eng.runner.model
    prompts = [p.text[:400] for p in load_domain("chat", args.batch, seed=3)]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def ours(batch):
        t = time.perf_counter()
        outs = eng.generate_batch(ids[:batch], params)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    def hf(batch):
        ours_attn = model.config._attn_implementation
        set_attn(model, "sdpa")
        try:
            width = max(len(x) for x in ids[:batch])
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids[:batch]])
            att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids[:batch]])
            t = time.perf_counter()
            with torch.inference_mode(), plain_linears(model):      # transformers as users run it
                model.generate(inp, attention_mask=att, max_new_tokens=args.max_tokens,
                               min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=pad)
            return batch * args.max_tokens / (time.perf_counter() - t)
        finally:
            set_attn(model, ours_attn)

    def hf_on_worker(batch):
        # on the engine's worker thread: both systems compute on the same thread and OpenMP pool
        # (a second thread's pool would make every barrier in the process sleep; see Engine)
        return eng.run_on_worker(hf, batch)

    results = {}
    for batch in (1, args.batch):
        ours(batch), hf_on_worker(batch)                          # warm-up
        o, h = [], []
        for _ in range(args.repeats):
            o.append(ours(batch))
            h.append(hf_on_worker(batch))
        results[batch] = {"aurora_tok_s": statistics.median(o), "hf_tok_s": statistics.median(h)}
        results[batch]["ratio"] = results[batch]["aurora_tok_s"] / results[batch]["hf_tok_s"]
    print(json.dumps({"model": args.model, "dtype": str(eng.dtype), "compile": args.compile,
                      "packed_linear_bytes": eng.stats()["packed_linear_bytes"],
                      "fast_path": eng.runner.fast is not None,
                      "threads": torch.get_num_threads(),
                      "results": results}, indent=2))
    print("\n| batch | Aurora tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for b, r in results.items():
        print(f"| {b} | {r['aurora_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['ratio']:.2f}× |")
    eng.close()


if __name__ == "__main__":
    main()

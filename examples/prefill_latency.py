"""Long-prompt latency: time to first token vs transformers, and inter-token gaps of a running
stream while a long prompt prefills (chunked vs whole).

TTFT: Aurora `generate_batch(max_tokens=1)` vs transformers `generate(max_new_tokens=1)`, same
weights, same prompt (Python standard-library source), interleaved, medians. ITL: one stream
decodes while a long prompt arrives; the largest gap between its tokens is reported with
`prefill_chunk` on and off (off: the whole prompt runs in one step and the stream stalls).

    python examples/prefill_latency.py [--lengths 2000,8000] [--repeats 1] [--itl-length 2000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from aurora import Engine, EngineConfig, SamplingParams
from aurora.engine.worker import ComputeThread


def long_ids(tok, n: int) -> list[int]:
    import sysconfig
    text, ids = "", []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += path.read_text(errors="replace")
        if len(text) > 6 * n:
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) >= n:
                return ids[:n]
    raise RuntimeError("not enough standard-library text")


def itl_during_prefill(eng: Engine, prompt: list[int], chunk: int) -> dict:
    """Largest gap between a decoding stream's tokens while `prompt` prefills."""
    eng.scheduler.prefill_chunk = chunk
    stamps, started = [], threading.Event()

    def on_token(out):
        stamps.append(time.perf_counter())
        started.set()
    eng.add_request([100 + i for i in range(16)], SamplingParams(max_tokens=10_000, temperature=0,
                                                                  ignore_eos=True), on_token, "stream")
    started.wait(120)
    deadline = time.perf_counter() + 120
    while len(stamps) < 6 and time.perf_counter() < deadline:     # a few tokens of steady decoding
        time.sleep(0.05)
    t0 = time.perf_counter()
    eng.generate_batch([prompt], SamplingParams(max_tokens=1, temperature=0))
    t1 = time.perf_counter()
    eng.abort("stream")
    time.sleep(0.5)
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b < t0]
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
    return {"prefill_chunk": chunk, "ttft_s": t1 - t0, "itl_before_ms": 1000 * statistics.median(before or [0.0]),
            "max_gap_during_ms": 1000 * max(during, default=t1 - t0),
            "tokens_during": sum(t0 < s < t1 for s in stamps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2000,8000")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--itl-length", type=int, default=2000, help="prompt tokens of the ITL check (0: skip it)")
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    eng = Engine(EngineConfig(model=args.model, draft="none", online=False, kv_tokens=max(lengths) + 2048,
                              prefill_chunk=args.chunk, prefix_cache=False))   # repeats: time every prefill
    torch.set_num_threads(eng.serve_threads())
    tok, model = eng.tokenizer, eng.runner.model
    params = SamplingParams(max_tokens=1, temperature=0)

    def ours(ids):
        t = time.perf_counter()
        eng.generate_batch([ids], params)
        return time.perf_counter() - t

    def hf(ids):
        # on Aurora's compute thread, like the engines: one OpenMP pool in the process (engine/worker.py)
        return ComputeThread.get().call(_hf, ids)

    def _hf(ids):
        model.config._attn_implementation = "sdpa"
        try:
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=1, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t
        finally:
            model.config._attn_implementation = "aurora_paged"

    warm = long_ids(tok, 256)
    ours(warm), hf(warm)
    results = {}
    for n in lengths:
        ids = long_ids(tok, min(n, eng.max_model_len - 1))
        o, h = [], []
        for _ in range(args.repeats):
            o.append(ours(ids))
            h.append(hf(ids))
        results[n] = {"aurora_ttft_s": statistics.median(o), "hf_ttft_s": statistics.median(h)}
        results[n]["ratio"] = results[n]["aurora_ttft_s"] / results[n]["hf_ttft_s"]
        print(n, json.dumps(results[n]), flush=True)
    itl = []
    if args.itl_length > 0:                    # 0: TTFT only
        itl_ids = long_ids(tok, args.itl_length)
        itl = [itl_during_prefill(eng, itl_ids, args.chunk), itl_during_prefill(eng, itl_ids, 0)]
    print(json.dumps({"model": args.model, "dtype": str(eng.dtype), "threads": torch.get_num_threads(),
                      "ttft": results, "itl": itl}, indent=2))
    print("\n| prompt tokens | Aurora TTFT s | transformers TTFT s | ratio |\n|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['aurora_ttft_s']:.2f} | {r['hf_ttft_s']:.2f} | {r['ratio']:.2f} |")
    if itl:
        print("\n| prefill_chunk | stream ITL before ms | max gap during prefill ms | stream tokens during |\n|---|---|---|---|")
        for r in itl:
            print(f"| {r['prefill_chunk']} | {r['itl_before_ms']:.0f} | {r['max_gap_during_ms']:.0f} | {r['tokens_during']} |")
    eng.close()


if __name__ == "__main__":
    main()

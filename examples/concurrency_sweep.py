"""Throughput under load: concurrent streams x draft x decoding mode, beside transformers.

For each concurrency (1, 4, 16 streams) and mode (greedy; temperature 0.7 with top_p 0.9),
every Aurora configuration serves the same prompts (code and chat, one wave of `c` requests),
and transformers `generate` runs them as one left-padded batch on the same weights. Greedy and
sampled cells of a round serve the *same* prompts, each mode on its own engine (a draft that
remembers traffic must not see the other mode's outputs), so sampled / greedy compares like with
like. Drafts
use the adaptive policy unless suffixed ":fixed"; ":freq" makes the suffix draft sample its
children from continuation frequencies under sampling (`suffix_q="frequency"`); ":pooled" and
":linear" run the adaptive policy without per-source statistics and on the fitted cost line
instead of the measured curve (`policy_sources=False`, `policy_costs="linear"`, for A/Bs); the options
combine (":fixed/freq", ":pooled/linear"). One process, interleaved, each engine warmed
up on other prompts first (the adaptive policy and the cost model learn online from that); odd
rounds run the modes and the systems in reverse order (the machine's speed drifts within a round:
`none` read 0.82-1.08x sampled / greedy in one run, though sampling costs it nothing measurable).
A stream is a closed-loop client: it sends its next prompt the moment its previous request
finishes, so `c` streams keep `c` requests in flight. A round gives each stream
max(1, 4 // c) + 1 prompts (at least `--per-stream`) and counts the tokens emitted until the first stream runs out (every
stream busy the whole time: a closed wave of `c` requests would instead end with a tail where
speculation has made some requests finish early and the batch runs part-empty). transformers
has no continuous batching: it runs the same prompts as left-padded batches of `c`. Every
(round, streams) draws prompts no engine has seen: a draft that remembers traffic
(`suffix`) would otherwise replay its own earlier outputs of a repeated prompt. Each JSON row
carries every round's tok/s (`rounds`) and, beside the medians, the median of each round's own
ratio to `none` (`paired_vs_none`): a round's systems run minutes apart, rounds further apart.

    python examples/concurrency_sweep.py [--conc 1,4,16] [--max-tokens 32] [--repeats 1] [--vary-lengths]
        [--drafts none,ngram,eagle+ngram,eagle+ngram:fixed]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch

from aurora import Engine, EngineConfig, SamplingParams, SpecConfig
from aurora.engine.worker import ComputeThread
from aurora.models.packed_linear import plain_linears
from aurora.workloads import load_domain

MODES = {"greedy": dict(temperature=0.0), "T0.7/p0.9": dict(temperature=0.7, top_p=0.9)}


def per_stream(c: int, at_least: int = 0) -> int:
    """Prompts each of `c` streams serves in a round (1 stream: five one after another; 16
    streams: two, or `--per-stream`)."""
    return max(max(1, 4 // c) + 1, at_least)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conc", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--drafts", default="none,ngram,eagle+ngram,eagle+ngram:fixed")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=1, help="median of this many interleaved rounds per cell")
    ap.add_argument("--per-stream", type=int, default=0,
                    help="at least this many prompts per stream and round (default: 5 at one stream, 2 from "
                         "4 streams on). The count stops when the first stream runs dry, so the other streams' "
                         "last requests are cut after their prefill; more prompts per stream shrink that edge")
    ap.add_argument("--vary-lengths", action="store_true",
                    help="reply lengths drawn per prompt from [max_tokens/2, 3*max_tokens/2] (the same for every "
                         "system), as in real traffic; by default every reply has max_tokens, so without "
                         "speculation all streams finish together and their next prompts prefill in one step")
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    modes = args.modes.split(",")
    n = 4 + args.repeats * sum(c * per_stream(c, args.per_stream) for c in concs)     # warm-up + one fresh set per round
    code, chat = load_domain("code", n, seed=7), load_domain("chat", n, seed=7)
    names = args.drafts.split(",")
    engines = {}                                                      # (draft, mode) -> its own engine
    for name in names:
        draft, _, opts = name.partition(":")
        flags = set(opts.split("/")) - {""}
        known = {"fixed", "freq", "pooled", "linear"}
        if flags - known:
            raise SystemExit(f"unknown draft options {sorted(flags - known)} in {name!r}: "
                             f"use {', '.join(sorted(known))}")
        for mode in modes:
            engines[name, mode] = Engine(EngineConfig(
                model=args.model, draft=draft, online=False, kv_tokens=8192, prefix_cache=False,   # repeats
                spec=SpecConfig(adaptive="fixed" not in flags, suffix_q="frequency" if "freq" in flags else "point",
                                policy_sources="pooled" not in flags,
                                policy_costs="linear" if "linear" in flags else "measured")))
    first = next(iter(engines.values()))
    torch.set_num_threads(first.serve_threads())
    tok, model = first.tokenizer, first.runner.model
    pools = {d: [tok.encode(p.text[:500], add_special_tokens=False) for p in ps] for d, ps in (("code", code), ("chat", chat))}

    def fresh(c):       # the next c prompts nobody has served: ceil(c/2) code, floor(c/2) chat, interleaved
        out = []
        for i in range(c):
            out.append(pools["code" if i % 2 == 0 else "chat"].pop(0))
        return out

    warm = fresh(4)

    def reply_len(x: list[int]) -> int:
        """A prompt's reply length: max_tokens, or with --vary-lengths one drawn from the prompt itself."""
        if not args.vary_lengths:
            return args.max_tokens
        lo = max(1, args.max_tokens // 2)
        return random.Random(len(x) * 1_000_003 + sum(x)).randint(lo, args.max_tokens + lo)   # same in every run

    def aurora(eng, ids, mode, c):
        """tok/s of `c` closed-loop streams over `ids` (stream j serves ids[j::c]), counted until
        the first stream has finished its last request."""
        queues = [list(ids[j::c]) for j in range(c)]
        lock, done, idle = threading.Lock(), threading.Event(), threading.Event()
        state = {"tokens": 0, "error": None, "live": c}          # live: streams with a request in flight

        def submit(j):
            x = queues[j].pop(0)
            params = SamplingParams(max_tokens=reply_len(x), ignore_eos=True, seed=1, **MODES[mode])
            eng.add_request(x, params, lambda out: on_output(j, out))

        def on_output(j, out):                         # on the engine's thread
            with lock:
                if not done.is_set():
                    state["tokens"] += len(out.delta_token_ids)
                if not out.finished:
                    return
                if out.error and not done.is_set():
                    state["error"] = out.error
                elif queues[j] and not done.is_set():
                    submit(j)
                    return
                done.set()                             # a stream ran dry (or failed): stop counting
                state["live"] -= 1
                if state["live"] == 0:
                    idle.set()
        t = time.perf_counter()
        for j in range(c):
            submit(j)
        done.wait()
        seconds = time.perf_counter() - t
        idle.wait()                                    # the other streams finish their requests
        if state["error"]:
            raise RuntimeError(f"a request failed: {state['error']}")
        return state["tokens"] / seconds

    def hf(ids, mode, c):
        # on Aurora's compute thread, like the engines: one OpenMP pool in the process (engine/worker.py)
        seconds = sum(ComputeThread.get().call(_hf, ids[i:i + c], mode) for i in range(0, len(ids), c))
        return sum(reply_len(x) for x in ids) / seconds      # a padded batch runs to its longest reply

    def _hf(ids, mode):                                # seconds for one padded batch
        model.config._attn_implementation = "sdpa"
        try:
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            m = MODES[mode]
            kw = dict(do_sample=True, temperature=m["temperature"], top_p=m["top_p"], top_k=0) if m["temperature"] \
                else dict(do_sample=False)
            t = time.perf_counter()
            with torch.inference_mode(), plain_linears(model):      # transformers as users run it
                longest = max(reply_len(x) for x in ids)
                model.generate(inp, attention_mask=att, max_new_tokens=longest,
                               min_new_tokens=longest, pad_token_id=pad, **kw)
            return time.perf_counter() - t
        finally:
            model.config._attn_implementation = "aurora_paged"

    for (name, mode), eng in engines.items():          # warm-up: kernels, allocator, online estimates
        eng.generate_batch(warm, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **MODES[mode]))
    hf(warm[:1], "greedy", 1)
    rows = []
    for c in concs:
        samples = {mode: {"hf": [], **{name: [] for name in names}} for mode in modes}
        for r in range(args.repeats):
            ids = fresh(c * per_stream(c, args.per_stream))                 # the same prompts for every engine and mode
            flip = r % 2 == 1                              # odd rounds run modes and systems in reverse order,
            for mode in (modes[::-1] if flip else modes):  # so the machine's drift within a round favours no one
                samples[mode]["hf"].append(hf(ids, mode, c))
                for name in (names[::-1] if flip else names):
                    samples[mode][name].append(aurora(engines[name, mode], ids, mode, c))
        for mode in modes:
            row = {"streams": c, "mode": mode, **{k: statistics.median(v) for k, v in samples[mode].items()},
                   "rounds": {k: [round(x, 2) for x in v] for k, v in samples[mode].items()}}   # the spread
            if "none" in names:     # median over rounds of each round's own ratio (drift between rounds cancels)
                row["paired_vs_none"] = {k: round(statistics.median(a / b for a, b in zip(v, samples[mode]["none"])), 3)
                                         for k, v in samples[mode].items() if k != "none"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    policy = {f"{name} {mode}": {k: v for k, v in eng.stats().items()
                                 if k.startswith("policy_") or k == "packed_linear_bytes"}
              for (name, mode), eng in engines.items()}    # packed: 0 where the engine's linears stayed plain
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                      "vary_lengths": args.vary_lengths,
                      "policy": policy}, indent=1, default=str))
    print("\n| streams | mode | transformers tok/s | " + " | ".join(f"{n} tok/s" for n in names)
          + " | " + " | ".join(f"{n} / none" for n in names if n != "none") + " | none / transformers |")
    print("|---" * (3 + 2 * len(names)) + "|")
    for r in rows:
        base = r.get("none")
        ratios = [f"{r[n] / base:.2f}×" if base else "-" for n in names if n != "none"]
        print(f"| {r['streams']} | {r['mode']} | {r['hf']:.1f} | " + " | ".join(f"{r[n]:.1f}" for n in names)
              + " | " + " | ".join(ratios) + f" | {(base or 0) / r['hf']:.2f}× |")
    if len(modes) == 2:                                 # sampled tok/s / greedy tok/s, same draft
        print("\n| streams | " + " | ".join(f"{n} {modes[1]} / {modes[0]}" for n in names) + " |")
        print("|---" * (1 + len(names)) + "|")
        for c in concs:
            a, b = (next(r for r in rows if r["streams"] == c and r["mode"] == m) for m in modes)
            print(f"| {c} | " + " | ".join(f"{b[n] / a[n]:.2f}×" for n in names) + " |")
    for eng in engines.values():
        eng.close()


if __name__ == "__main__":
    main()

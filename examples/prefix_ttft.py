"""Time to first token over a long chat session, prefix cache on vs off.

One conversation grows turn by turn: each turn's prompt is the chat template over every earlier
user message (real ShareGPT user turns) and reply, plus a new user message. Two engines, same
weights and draft, one with `EngineConfig.prefix_cache` and one without, serve each turn one
after the other (the order alternates), with identical prompts: both get the history built from
the cached engine's replies. With the cache, a turn prefills only what the last turn did not
(the new message, and whatever re-tokenising the last reply changed).

    python examples/prefix_ttft.py [--turns 12] [--max-tokens 64] [--out prefix_ttft.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

from aurora import Engine, EngineConfig, SamplingParams


def user_turns(n: int, max_chars: int) -> list[str]:
    from aurora.workloads import multiturn
    return [p.messages[-1]["content"] for p in multiturn(n, max_chars=max_chars)]


def serve(eng: Engine, prompt: list[int], params: SamplingParams) -> dict:
    out = eng.generate_batch([prompt], params)[0]
    return {"ttft_s": out.stats["ttft_s"], "latency_s": out.stats["latency_s"], "token_ids": out.token_ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default="suffix+ngram")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-chars", type=int, default=600, help="longest user message (characters)")
    ap.add_argument("--out", default=None, help="write the per-turn rows here (JSON)")
    args = ap.parse_args()

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    engines = {on: Engine(EngineConfig(model=args.model, draft=args.draft, online=False, prefix_cache=on,
                                       kv_tokens=16384, max_batch=1))
               for on in (True, False)}
    try:
        tok = engines[True].tokenizer
        for eng in engines.values():                       # warm-up, unrelated text
            serve(eng, tok.encode("Hello there.", add_special_tokens=False), params)
        messages, rows = [], []
        for t, text in enumerate(user_turns(args.turns, args.max_chars)):
            messages.append({"role": "user", "content": text})
            prompt = engines[True].chat_prompt(messages)
            order = (True, False) if t % 2 == 0 else (False, True)
            got = {on: serve(engines[on], prompt, params) for on in order}
            messages.append({"role": "assistant",
                             "content": tok.decode(got[True]["token_ids"], skip_special_tokens=True)})
            hits = engines[True].stats()["prefix_hit_tokens"]
            rows.append({"turn": t, "prompt_tokens": len(prompt), "ttft_on_s": got[True]["ttft_s"],
                         "ttft_off_s": got[False]["ttft_s"], "hit_tokens_total": hits,
                         "latency_on_s": got[True]["latency_s"], "latency_off_s": got[False]["latency_s"]})
            r = rows[-1]
            print(f"turn {t:2d}  prompt {r['prompt_tokens']:5d} tokens  TTFT off {r['ttft_off_s']:6.3f} s  "
                  f"on {r['ttft_on_s']:6.3f} s  ({r['ttft_off_s'] / r['ttft_on_s']:.1f}×)  "
                  f"request off {r['latency_off_s']:5.2f} s  on {r['latency_on_s']:5.2f} s", flush=True)
        stats = engines[True].stats()
    finally:
        for eng in engines.values():
            eng.close()
    later = rows[1:]
    print(f"\nturns 1..{len(rows) - 1}: median TTFT off {statistics.median(r['ttft_off_s'] for r in later):.3f} s, "
          f"on {statistics.median(r['ttft_on_s'] for r in later):.3f} s; prompt tokens served from the cache "
          f"{stats['prefix_hit_tokens']} of {stats['prefix_query_tokens']} ({stats['prefix_hit_rate']:.0%})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "stats": {k: v for k, v in stats.items()
                                                                    if k.startswith("prefix_")}}, f, indent=1)


if __name__ == "__main__":
    main()

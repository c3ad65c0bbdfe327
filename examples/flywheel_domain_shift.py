"""The flywheel from the library API, in a few lines: an online eagle+ngram engine
serves a domain-shifting stream and we watch tau and the draft version per request.
(`aurora demo` is the full version, with a baseline, a summary and a plot.)

    python examples/flywheel_domain_shift.py [--model tiny-llama] [--per-domain 4]
"""
from __future__ import annotations

import argparse

from aurora.config import EngineConfig
from aurora.engine.engine import Engine
from aurora.types import SamplingParams
from aurora.workloads import domain_shift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-domain", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    max_chars = 300 if args.model.startswith("tiny-") else 2000
    prompts = domain_shift(["code", "finance", "chat"], args.per_domain, max_chars=max_chars)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    with Engine(EngineConfig(model=args.model, draft="eagle+ngram", online=True)) as engine:
        for i, p in enumerate(prompts):
            ids = engine.chat_prompt(p.messages) if p.messages else engine.encode_prompt(p.text)
            out = engine.generate_batch([ids], params)[0]           # one request at a time
            trainer = engine.stats().get("trainer") or {}
            print(f"#{i:<3d} {p.domain:<8} tau {out.stats['accepted_length']:.2f}  "
                  f"draft v{out.stats['draft_version']}  trainer steps {trainer.get('steps', 0)}")


if __name__ == "__main__":
    main()

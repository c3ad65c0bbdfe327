"""Frozen A/B of learned-draft configurations: tree shape and saved draft, side by side in one run.

Every system serves the same raw-text bench prompts (as `aurora bench --stream` sends them), batch
1, greedy, frozen (`online=False`), request by request in turn (odd requests in reverse order, so
a slow stretch of the machine falls on all alike). A variant is `ngram` or

    NAME=SHAPE:WIDTH[:MIN_PROB][@CHECKPOINT]

i.e. `eagle:<checkpoint>+ngram` with `SpecConfig(shape=SHAPE, width=WIDTH, eagle_min_prob=MIN_PROB)`
(checkpoint default: `--checkpoint`). Per domain and overall: tok/s = total tokens / total request
seconds (prefill included), its ratio over the first variant, and tau = decode tokens per target
forward. Seeds 0-3 draw bench prompts, which `aurora pretrain-draft` never trains on.

    python examples/draft_ab.py --seed 1 ngram chain=chain:1 static2=static:2 dynamic3=dynamic:3
    python examples/draft_ab.py ngram day0=static:2 code=static:2@~/.cache/aurora/drafts/smollm2-135m-day0-code
"""
from __future__ import annotations

import argparse
import json
import os

from aurora.bench.run import quiet_transformers, stop_ids
from aurora.bench.systems import AuroraSystem, load_tokenizer
from aurora.config import EngineConfig, SpecConfig
from aurora.types import SamplingParams
from aurora.workloads import domain_shift

DEFAULT_CKPT = "~/.cache/aurora/drafts/smollm2-135m-day0"


def parse_variant(text: str, checkpoint: str) -> tuple[str, str, SpecConfig | None]:
    """'ngram' | 'NAME=SHAPE:WIDTH[:MIN_PROB][@CKPT]' -> (name, draft, spec)."""
    if text == "ngram":
        return "ngram", "ngram", None
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"draft_ab: variant {text!r} is not 'ngram' or NAME=SHAPE:WIDTH[:MIN_PROB][@CKPT]")
    rest, _, ckpt = rest.partition("@")
    shape, _, rest = rest.partition(":")
    width, _, min_prob = rest.partition(":")
    spec = SpecConfig(shape=shape, width=int(width or 2), **({"eagle_min_prob": float(min_prob)} if min_prob else {}))
    path = os.path.expanduser(ckpt or checkpoint)
    if not os.path.isdir(path):
        raise SystemExit(f"draft_ab: no saved draft at {path}; build one with `make draft`")
    return name, f"eagle:{path}+ngram", spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="ngram | NAME=SHAPE:WIDTH[:MIN_PROB][@CHECKPOINT]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=DEFAULT_CKPT, help="saved draft of the variants without @ (default: "
                    "the day-0 draft of `make draft`)")
    ap.add_argument("--domains", default="code,finance,chat")
    ap.add_argument("--per-domain", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-prompt-chars", type=int, default=1200)
    ap.add_argument("--out", default=None, help="write the per-request rows here (JSON)")
    args = ap.parse_args()
    variants = [parse_variant(v, args.checkpoint) for v in args.variants]
    quiet_transformers()
    tok = load_tokenizer(args.model)
    domains = args.domains.split(",")
    prompts = domain_shift(domains, args.per_domain, seed=args.seed, max_chars=args.max_prompt_chars)
    ids = [list(tok.encode(p.text, add_special_tokens=False)) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=stop_ids(tok, args.model))
    systems = {name: AuroraSystem(name, EngineConfig(model=args.model, draft=draft, online=False, max_batch=1,
                                                     **({"spec": spec} if spec else {})))
               for name, draft, spec in variants}
    for system in systems.values():                                  # warm-up, not counted
        system.generate(ids[0], params)
    rows: dict[str, list[dict]] = {name: [] for name in systems}
    for i, x in enumerate(ids):
        for name in (list(systems) if i % 2 == 0 else list(systems)[::-1]):
            out = systems[name].generate(x, params)
            rows[name].append({"domain": prompts[i].domain, "tokens": len(out.token_ids), "seconds": out.seconds,
                               "forwards": out.num_forwards or 0})
        print(f"  {i + 1}/{len(ids)} requests", flush=True)
    for system in systems.values():
        system.close()
    print("\n| domain | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for d in [*domains, "all"]:
        cells, first = [], None
        for rs in rows.values():
            sel = [r for r in rs if d == "all" or r["domain"] == d]
            rate = sum(r["tokens"] for r in sel) / max(1e-9, sum(r["seconds"] for r in sel))
            tau = sum(r["tokens"] - 1 for r in sel) / max(1, sum(r["forwards"] for r in sel))
            first = first or rate
            cells.append(f"{rate:.2f} ({rate / first:.3f}x, τ {tau:.2f})")
        print(f"| {d} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

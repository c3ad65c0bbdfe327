"""Where the learned draft's time goes in serving, what its weights' precision buys, and how well
its own probability q predicts acceptance.

Systems, one process, requests interleaved (request i on each system in turn), batch 1, greedy,
frozen (online=False): `ngram`, and `eagle:<ckpt>+ngram` with the draft head's serving weights in
bf16 (as served) and, for an A/B, weight-only int8 / int4 (models/quant.py's kernels; the draft
changes, verification keeps the output exact). Per system: tok/s (total tokens / total request
seconds) and its ratio over `ngram`, tau, and per target step the draft, verify and busy ms. For
the bf16 system the draft's time per step is split into the head's calls (context rows, tree rows,
logits over the draft vocabulary, candidate selection; the rest is bookkeeping in Python), and
its judged learned nodes are binned by their own draft probability q: acceptance by (depth, q bin).

    python examples/draft_costs.py [--checkpoint DIR] [--domains code,finance] [--per-domain 10]
                                   [--variants ngram,bf16,int8,int4] [--max-tokens 48]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict

import torch
from torch import nn

from aurora.bench.run import default_max_chars, encode, quiet_transformers, stop_ids
from aurora.bench.systems import AuroraSystem, load_tokenizer
from aurora.config import EngineConfig
from aurora.drafts import compose
from aurora.drafts import eagle as eagle_draft
from aurora.models import eagle as eagle_model
from aurora.models.quant import Int4Linear, Int8Linear
from aurora.types import SamplingParams
from aurora.workloads import domain_shift

DEFAULT_CKPT = os.path.expanduser("~/.cache/aurora/drafts/smollm2-135m-day0")
Q_BINS = 10

TIMES: dict[str, float] = defaultdict(float)     # bf16 system only: seconds per labelled call
JUDGED: list[tuple[int, float, bool]] = []       # bf16 system only: (depth, q, accepted) per learned node
CURRENT = {"system": ""}


def _timed(cls, name: str, label: str) -> None:
    """Accumulate the method's wall time under `label` (a head call inside the context-rows call
    under "context: <label>")."""
    fn = getattr(cls, name)

    def wrapper(*args, **kwargs):
        inside = CURRENT.get("context", False)
        if name == "_contexts":
            CURRENT["context"] = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if name == "_contexts":
                CURRENT["context"] = False
            if CURRENT["system"] == "bf16":
                TIMES[f"context: {label}" if inside else label] += time.perf_counter() - t0
    setattr(cls, name, wrapper)


def instrument() -> None:
    """Time the head's calls, and record every judged learned node of the bf16 system."""
    _timed(eagle_draft.EagleProposer, "propose", "propose")
    _timed(eagle_draft.EagleProposer, "_contexts", "context rows")
    _timed(eagle_model.EagleHead, "rows_step", "tree rows")
    _timed(eagle_model.EagleHead, "logits", "logits")
    observe = compose.ComposedProposer.observe

    def record(self, trees, outcomes):
        if CURRENT["system"] == "bf16":
            for tree, (path, _) in zip(trees, outcomes):
                on_path = set(path)
                for n in getattr(tree, "learned", ()) if tree is not None else ():
                    parent = tree.parents[n]
                    if parent < 0 or parent in on_path:             # judged: its parent was accepted
                        JUDGED.append((tree.depths[n], math.exp(tree.logprobs[n]), n in on_path))
        return observe(self, trees, outcomes)
    compose.ComposedProposer.observe = record


def quantize_draft(engine, mode: str) -> None:
    """Weight-only int8 / int4 copies of both serving slots' linear layers (the fused q/k/v and
    gate/up GEMMs included). For this A/B only: a hot swap would not requantize them."""
    quant = Int4Linear if mode == "int4" else Int8Linear
    learned = next(p for p in engine.proposer.parts if p.learnable)
    learned._pack_slots()

    def q(layers):
        plain = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers), bias=False)
        plain.weight.data = torch.cat([m.weight.detach() for m in layers])
        out = quant(plain)
        out.weight = layers[0].weight.detach()            # callers read .weight.dtype
        return out
    for head in learned.slots:
        attn, mlp = head.midlayer.self_attn, head.midlayer.mlp
        head._qkv, head._gate_up = q([attn.q_proj, attn.k_proj, attn.v_proj]), q([mlp.gate_proj, mlp.up_proj])
        attn.o_proj, mlp.down_proj = q([attn.o_proj]), q([mlp.down_proj])
        head.fc, head.lm_head = q([head.fc]), q([head.lm_head])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=DEFAULT_CKPT, help="saved draft (default: the day-0 draft of `make draft`)")
    ap.add_argument("--domains", default="code,finance")
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--variants", default="ngram,bf16,int8,int4")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not os.path.isdir(args.checkpoint) and any(v != "ngram" for v in variants):
        raise SystemExit(f"draft_costs: no saved draft at {args.checkpoint}; build one with `make draft`")
    quiet_transformers()
    instrument()
    tok = load_tokenizer(args.model)
    prompts = domain_shift(args.domains.split(","), args.per_domain, seed=args.seed,
                           max_chars=default_max_chars(args.model))
    ids = [encode(tok, p) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=stop_ids(tok, args.model))
    systems = {}
    for v in variants:
        draft = "ngram" if v == "ngram" else f"eagle:{args.checkpoint}+ngram"
        systems[v] = AuroraSystem(v, EngineConfig(model=args.model, draft=draft, online=False, max_batch=1))
        if v in ("int8", "int4"):
            quantize_draft(systems[v].engine, v)
    for v, system in systems.items():                               # warm-up, not counted
        system.generate(ids[0], params)
    TIMES.clear()
    JUDGED.clear()
    before = {v: system.engine.stats() for v, system in systems.items()}
    served: dict[str, list[tuple[int, float]]] = {v: [] for v in systems}
    for i, x in enumerate(ids[1:], 1):
        for v, system in systems.items():
            CURRENT["system"] = v
            out = system.generate(x, params)
            served[v].append((len(out.token_ids), out.seconds))
        CURRENT["system"] = ""
        print(f"  {i}/{len(ids) - 1} requests", flush=True)
    print("\n| system | tok/s | over first | tau | draft ms/step | verify ms/step | busy ms/step |")
    print("|---|---|---|---|---|---|---|")
    first = None
    bf16_steps = 0
    for v, system in systems.items():
        s0, s1 = before[v], system.engine.stats()
        steps = max(1, s1["num_steps"] - s0["num_steps"])
        tokens = sum(t for t, _ in served[v])
        rate = tokens / max(1e-9, sum(s for _, s in served[v]))
        first = first or rate
        tau = (tokens - len(served[v])) / steps                     # decode tokens per target step
        ms = {k: 1000 * (s1[k] - s0[k]) / steps for k in ("draft_s", "verify_s", "busy_s")}
        print(f"| {v} | {rate:.2f} | {rate / first:.3f}x | {tau:.3f} | {ms['draft_s']:.2f} | {ms['verify_s']:.2f} "
              f"| {ms['busy_s']:.2f} |")
        bf16_steps = steps if v == "bf16" else bf16_steps
        system.close()
    if bf16_steps and TIMES:
        per = {k: 1000 * t / bf16_steps for k, t in TIMES.items()}
        rest = per["propose"] - per["context rows"] - per.get("tree rows", 0) - per.get("logits", 0)
        print(f"\nbf16 draft, ms per target step: propose {per['propose']:.2f} = context rows "
              f"{per['context rows']:.2f} (of which the head's layer {per.get('context: tree rows', 0):.2f}) "
              f"+ tree rows {per.get('tree rows', 0):.2f} + logits {per.get('logits', 0):.2f} + the rest {rest:.2f}")
    if JUDGED:
        print("\n| depth | q bin | judged learned nodes | accepted |")
        print("|---|---|---|---|")
        for depth in sorted({d for d, _, _ in JUDGED}):
            for b in range(Q_BINS):
                cell = [a for d, q, a in JUDGED if d == depth and min(Q_BINS - 1, int(q * Q_BINS)) == b]
                if len(cell) >= 5:
                    print(f"| {depth} | {b / Q_BINS:.1f}-{(b + 1) / Q_BINS:.1f} | {len(cell)} | "
                          f"{sum(cell) / len(cell):.2f} |")


if __name__ == "__main__":
    main()

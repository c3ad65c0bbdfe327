"""Offline A/B of flywheel training choices at equal optimizer steps, on real traces.

Step 1 (`--collect`): serve real requests (aurora.workloads) once with the real model and an
online eagle+ngram engine whose trainer is paused, and save the traces it collected
(target features + the target's top-k distribution from verification). Step 2: train
fresh drafts on those traces, one arm at a time, the same number of optimizer steps and the
same window sampling seed per arm, and score each on held-out traces (simulated greedy
chain accepted length, and top-1 agreement at the first draft position).

Arms: init random vs from the target's LM head (imitation only), and imitation only vs
imitation + discard (log-space) vs imitation + discard (old probability-space hinge), and
imitation + the counterfactual KL at rejected nodes without the discard hinge;
and the learning rate of the default objective (lr_1e-3, lr_3e-3 vs discard_log at 3e-4);
and prompt positions as hard-label rows (prompt_0.5, prompt_1.0: TrainerConfig.w_prompt);
and prompt positions labelled with the target's own distribution (prompt_distil:
TrainerConfig.distil_prompt, from the final hidden state the traces keep) vs context only.
Every arm trains on its own copy of the traces; held-out traces are scored on the positions
verification labelled (their prompt rows are never distilled), so arms stay comparable.

    python examples/flywheel_ab.py --collect traces.pt --requests 40
    python examples/flywheel_ab.py --traces traces.pt --steps 1000
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from aurora import Engine, EngineConfig, SamplingParams, TrainerConfig
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import init_from_target
from aurora.models.eagle import build_head
from aurora.workloads import load_domain

ARMS = {
    "random_init": dict(init_from_target=False, w_discard=0.0, w_counterfactual=0.0, distil_prompt=False),
    "target_init": dict(init_from_target=True, w_discard=0.0, w_counterfactual=0.0, distil_prompt=False),
    "prompt_distil": dict(init_from_target=True, w_discard=0.0, w_counterfactual=0.0, distil_prompt=True),
    "discard_log": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="log"),
    "counterfactual_only": dict(init_from_target=True, w_discard=0.0, w_counterfactual=0.5),
    "discard_hinge": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="hinge"),
    # learning rate of the default objective (target init + log-space discard)
    "lr_1e-3": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="log", lr=1e-3),
    "lr_3e-3": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="log", lr=3e-3),
    # the serving defaults (TrainerConfig()) at three learning rates, for fine-tuning a saved
    # draft (--init): does the default rate undo what it learned? (docs/RESULTS.md: no, it did best)
    "defaults": dict(distil_prompt=True),
    "defaults_lr_1e-4": dict(distil_prompt=True, lr=1e-4),
    "defaults_lr_3e-5": dict(distil_prompt=True, lr=3e-5),
    # the prompt's positions as extra rows with hard labels (the next prompt token)
    "prompt_0.5": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="log", w_prompt=0.5),
    "prompt_1.0": dict(init_from_target=True, w_discard=0.5, w_counterfactual=0.5, discard="log", w_prompt=1.0),
}


def collect(args) -> None:
    prompts = []
    for domain in ("code", "chat"):
        prompts += [p.text[:800] for p in load_domain(domain, args.requests // 2, seed=3)]
    eng = Engine(EngineConfig(model=args.model, draft="eagle+ngram", online=True,
                              trainer=TrainerConfig(draft_vocab=args.draft_vocab)))
    eng.flywheel.pause()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), 4):
        eng.generate_batch(prompts[i:i + 4], params)
    recs = eng.flywheel.buffer.drain()
    eng.close()
    torch.save([r.__dict__ for r in recs], args.collect)
    print(json.dumps({"records": len(recs), "positions": sum(len(r.features) for r in recs),
                      "target_positions": sum(int(r.has_target.sum()) for r in recs),
                      "rejected": sum(len(r.rejected) for r in recs), "serve_s": round(time.perf_counter() - t0, 1)}))


def run_arm(name, eng, records, held, args) -> dict:
    records = copy.deepcopy(records)                 # distillation labels rows in place
    arm = {"distil_prompt": False} | ARMS[name]      # arms without the key: prompt rows stay context
    cfg = replace(TrainerConfig(draft_vocab=args.draft_vocab, batch_tokens=args.batch_tokens, span=args.span,
                                max_passes=1e9, replay_records=len(records), holdout_every=0), **arm)
    if args.init:                                    # a saved draft (e.g. the corpus day-0 draft)
        from aurora.flywheel.checkpoint import load_any
        head, _ = load_any(args.init, eng.runner)
        cfg = replace(cfg, draft_vocab=len(head.d2t))
    else:
        head = build_head(eng.runner, cfg.draft_vocab, seed=0)
        if cfg.init_from_target:
            init_from_target(head, eng.runner)
    tr = Trainer(head, eng.runner, cfg)
    tr.add_records(records)
    while tr.distil_pending():                       # label every prompt row first (not an optimizer step)
        pass
    windows = tr.eval_windows(held)
    score0 = tr.evaluate(tr.head, windows)
    t0 = time.perf_counter()
    curve = []
    for step in range(1, args.steps + 1):
        tr.optimizer_step()
        if step % max(1, args.steps // 5) == 0:
            curve.append((step, round(tr.evaluate(tr.head, windows), 4)))
    return {"arm": name, "steps": tr.steps, "tokens_trained": tr.tokens_trained, "rows_distilled": tr.rows_distilled,
            "replay_rows": tr.replay_rows(), "tau_start": round(score0, 4),
            "tau_end": curve[-1][1] if curve else score0, "curve": curve, "losses": tr.last_losses,
            "train_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--collect", help="serve requests and save traces to this file")
    ap.add_argument("--traces", help="train on traces saved by --collect")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--span", type=int, default=32)
    ap.add_argument("--arms", default="random_init,target_init,discard_log,discard_hinge")
    ap.add_argument("--init", help="start every arm from this saved draft instead of a new head")
    args = ap.parse_args()
    if args.collect:
        return collect(args)
    from aurora.flywheel.traces import TraceRecord
    records = [TraceRecord(**d) for d in torch.load(args.traces, weights_only=False)]
    held = [replace(r, prompt_hidden=None) for r in records[::6]]
    train = [r for i, r in enumerate(records) if i % 6]
    eng = Engine(EngineConfig(model=args.model, draft="none", online=False))
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for name in args.arms.split(","):                 # each arm printed as it finishes
        results.append(run_arm(name, eng, train, held, args))
        print(json.dumps(results[-1]), flush=True)
    eng.close()
    print(json.dumps({"train_records": len(train), "held_records": len(held), "arms": results}, indent=1))


if __name__ == "__main__":
    main()

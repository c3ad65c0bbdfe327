"""A/B of two draft-head designs on the same traces: the EAGLE-3 layer (current
`aurora.models.eagle`) against an older head module loaded from a file (e.g. the
pre-EAGLE-3 `inp`-projection head from git). Both train with the same Trainer, seed,
records and steps; we report simulated greedy chain tau on the held-back traces
(`--eval train`: on the first training traces, i.e. how fast each design fits).

    git show <rev>:aurora/models/eagle.py > /tmp/old_eagle.py
    python examples/ab_eagle3_head.py --old /tmp/old_eagle.py [--model smollm2-135m] [--steps 300]
        [--prompts 8] [--max-tokens 96] [--batch-tokens 1024]
"""
from __future__ import annotations

import argparse
import importlib.util
import time

from aurora.config import EngineConfig, TrainerConfig
from aurora.engine.engine import Engine
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import VocabCounter, remap_head
from aurora.models import eagle as new_eagle
from aurora.types import SamplingParams
from aurora.workloads import domain_shift


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_eagle", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="file with the other head's build_head")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per domain")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch-tokens", type=int, default=TrainerConfig.batch_tokens)
    ap.add_argument("--eval", choices=("holdout", "train"), default="holdout",
                    help="score on held-back traces, or on the training traces (fit speed)")
    args = ap.parse_args()
    max_chars = 300 if args.model.startswith("tiny-") else 2000
    prompts = domain_shift(["code", "finance", "chat"], args.prompts, max_chars=max_chars)
    cfg = TrainerConfig(batch_tokens=args.batch_tokens)
    with Engine(EngineConfig(model=args.model, draft="eagle", online=True, dtype="float32", trainer=cfg)) as eng:
        eng.flywheel.pause()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        for p in prompts:
            ids = eng.chat_prompt(p.messages) if p.messages else eng.encode_prompt(p.text)
            eng.generate_batch([ids], params)
        records = eng.flywheel.buffer.drain()
        runner = eng.runner
        counts = VocabCounter(runner.vocab_size)
        for r in records:
            counts.update(r.token_ids)
        results = {}
        for name, mod in (("eagle3", new_eagle), ("old", _load(args.old))):
            head = mod.build_head(runner, cfg.draft_vocab, cfg.seed)
            if len(head.d2t) < runner.vocab_size:
                remap_head(head, counts.top(len(head.d2t), head.d2t))
            tr = Trainer(head, runner, cfg)
            tr.add_records(records)
            if args.eval == "train":
                tr.replay, tr.holdout = list(records), list(records[:8])
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tr.optimizer_step()
            secs = time.perf_counter() - t0
            params_n = sum(p.numel() for p in head.parameters())
            results[name] = (tr.evaluate(tr.head), secs, params_n)
            print(f"{name:7s} sim tau {results[name][0]:.3f}  train {secs:.1f}s  params {params_n}", flush=True)
        print(f"records {len(records)}, steps {args.steps}, holdout {len(tr.holdout)}, "
              f"delta tau (eagle3 - old) {results['eagle3'][0] - results['old'][0]:+.3f}")


if __name__ == "__main__":
    main()

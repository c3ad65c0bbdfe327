"""The trainer's unit of work on saved real traces: wall time of one micro-batch (how long a
request that arrives mid-unit waits on a CPU, where serving and training take turns) and rows
trained per CPU-second, for a few `micro_tokens` / `span` settings.

    python examples/flywheel_ab.py --collect traces.pt --requests 40     # once
    python examples/trainer_units.py --traces traces.pt [--settings 256/128,128/64,96/32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from aurora import Engine, EngineConfig, TrainerConfig
from aurora.flywheel.traces import TraceRecord
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import init_from_target
from aurora.models.eagle import build_head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default="256/128,128/64,96/32", help="micro_tokens/span pairs")
    ap.add_argument("--units", type=int, default=12)
    args = ap.parse_args()
    records = [TraceRecord(**d) for d in torch.load(args.traces, weights_only=False)]
    eng = Engine(EngineConfig(model=args.model, draft="none", online=False))
    for setting in args.settings.split(","):
        micro, span = (int(x) for x in setting.split("/"))
        cfg = TrainerConfig(micro_tokens=micro, span=span, max_passes=1e9, replay_records=len(records),
                            holdout_every=0)
        head = build_head(eng.runner, cfg.draft_vocab, seed=0)
        init_from_target(head, eng.runner)
        tr = Trainer(head, eng.runner, cfg)
        tr.add_records(records)
        for _ in range(3):
            tr.train_step()                                  # warm-up
        times, rows0, cpu0 = [], tr.tokens_trained, time.process_time()
        for _ in range(args.units):
            t = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t)
        rows = tr.tokens_trained - rows0
        print(f"micro_tokens {micro}, span {span}: unit median {1e3 * statistics.median(times):.0f} ms, "
              f"max {1e3 * max(times):.0f} ms; {rows / (time.process_time() - cpu0):.0f} rows per CPU-second",
              flush=True)
    eng.close()


if __name__ == "__main__":
    main()

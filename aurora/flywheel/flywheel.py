"""The flywheel: traces -> ring buffer -> background trainer -> guarded hot swap.

Attaches to an `Engine` through its hooks: a step hook collects traces, a finish hook
seals them into the ring buffer, and a step-boundary hook flips weight slots and
watches live acceptance for rollbacks. Training runs in its own thread (CPU: its own
torch thread budget; GPU: its own CUDA stream). A trainer crash stops training only.
"""
from __future__ import annotations

import copy
import logging
import threading
import time

import torch

from aurora.config import TrainerConfig
from aurora.flywheel import checkpoint
from aurora.flywheel.traces import RingBuffer, TraceCollector
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import VocabCounter, remap_head
from aurora.flywheel.weights import all_finite, copy_into, publish

log = logging.getLogger("aurora.flywheel")
MIN_LIVE_STEPS = 128         # decode steps observed per version before judging a swap
VOCAB_REBUILD_EVERY = 100    # optimizer steps


class Flywheel:
    def __init__(self, engine, config: TrainerConfig):
        self.engine = engine
        self.config = config
        proposer = engine.proposer
        self.proposer = getattr(proposer, "learned", None) or proposer
        self.buffer = RingBuffer(config.buffer_bytes)
        self.collector = TraceCollector(self.buffer)
        self.trainer = Trainer(self.proposer.head, engine.runner, config)
        self.published = copy.deepcopy(self.trainer.head).eval().requires_grad_(False)
        self.previous = None                       # weights before the latest swap (for rollback)
        self._rollback_to = None                   # set by the engine thread, applied by the trainer
        self.vocab = VocabCounter(engine.runner.vocab_size)
        self.version = self.proposer.version
        self.swaps = self.rollbacks = self.rejected_candidates = self.nonfinite_restores = 0
        self.live: dict[int, list[int]] = {}       # version -> [decode steps, tokens]
        self.guard_scores: dict[str, float] = {}
        self.error: str | None = None
        self.paused = False
        self._closed = False
        self._last_publish = time.monotonic()
        self._steps_at_publish = 0
        self._vocab_built_at = -1
        self._state_lock = threading.Lock()        # held by the trainer per unit of work; save/load take it
        self.stream = torch.cuda.Stream() if engine.device.type == "cuda" else None
        engine.step_hooks.append(self._on_step)
        engine.finish_hooks.append(self.collector.on_finish)
        engine.before_step.append(self._at_boundary)
        engine.stats_extra["trainer"] = self.stats
        engine.stats_extra["buffer"] = self.buffer.stats
        self._thread = threading.Thread(target=self._run, name="aurora-trainer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ engine side
    def _on_step(self, view) -> None:
        self.collector.on_step(view)
        live = self.live.setdefault(view.draft_version, [0, 0])
        for tree, r, (path, _) in zip(view.trees, view.rows, view.outcomes):
            if tree is not None:
                live[0] += 1
                live[1] += len(path) + 1

    def _at_boundary(self) -> None:
        if self.proposer.flip():
            self.swaps += 1
        self._check_rollback()

    def _check_rollback(self) -> None:
        v, prev = self.proposer.version, self.previous
        if prev is None or self.config.rollback_drop <= 0:
            return
        now, before = self.live.get(v), self.live.get(prev[0])
        if not now or not before or now[0] < MIN_LIVE_STEPS or before[0] < MIN_LIVE_STEPS:
            return
        tau_now, tau_before = now[1] / now[0], before[1] / before[0]
        self.previous = None                       # judge each swap once
        if tau_now < tau_before * (1 - self.config.rollback_drop):
            log.warning("flywheel: live tau fell %.2f -> %.2f after swap to v%d; rolling back",
                        tau_before, tau_now, v)
            self._rollback_to = prev[1]            # applied by the trainer thread, the only slot writer

    # ------------------------------------------------------------ trainer thread
    def _run(self) -> None:
        if self.engine.device.type == "cpu":
            torch.set_num_threads(max(1, self.config.threads))
        try:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else _Null()
            with ctx:
                while not self._closed:
                    t0 = time.perf_counter()
                    if self.paused or not self._locked_work():
                        time.sleep(0.05)
                    elif self.stream is None and self.config.duty < 1:
                        # Python parts of training hold the GIL; leave serving its share.
                        time.sleep((time.perf_counter() - t0) * (1 / self.config.duty - 1))
        except Exception as exc:                    # serving continues with the last good draft
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("flywheel trainer crashed; training stopped, serving continues")

    def _apply_rollback(self) -> None:
        """Republish the pre-swap weights and restart training from them."""
        restored, self._rollback_to = self._rollback_to, None
        self.published.load_state_dict(restored.state_dict())
        self.trainer.head.load_state_dict(restored.state_dict())
        self.trainer.opt = self.trainer._make_opt()
        self.version += 1
        publish(self.proposer, self.published, self.version, self.stream)
        self.rollbacks += 1

    def _work(self) -> bool:
        if self._rollback_to is not None:
            self._apply_rollback()
        records = self.buffer.drain()
        if records:
            for rec in records:
                self.vocab.update(rec.token_ids)
            self.trainer.add_records(records)
        t = self.trainer
        if t.steps - self._vocab_built_at >= VOCAB_REBUILD_EVERY or (self._vocab_built_at < 0 and len(t.replay) >= 4):
            self._rebuild_vocab()
        stepped = t.train_step()
        if not t.weights_finite():
            self.nonfinite_restores += 1
            log.warning("flywheel: non-finite trainer weights; restoring last published draft")
            t.head.load_state_dict(self.published.state_dict())
            t.opt = t._make_opt()
            return True
        if not stepped:
            return bool(records)
        due = (t.steps - self._steps_at_publish >= self.config.publish_every_steps
               or time.monotonic() - self._last_publish >= self.config.publish_every_s)
        if due:
            self._maybe_publish()
        return True

    def _rebuild_vocab(self) -> None:
        head = self.trainer.head
        if len(head.d2t) >= self.engine.runner.vocab_size:
            self._vocab_built_at = self.trainer.steps
            return
        new = self.vocab.top(len(head.d2t), head.d2t.cpu())
        kept = remap_head(head, new)
        self.trainer.opt = self.trainer._make_opt()
        self._vocab_built_at = self.trainer.steps
        log.info("flywheel: draft vocabulary rebuilt (%.0f%% rows kept)", 100 * kept)

    def _maybe_publish(self) -> None:
        t = self.trainer
        self._steps_at_publish, self._last_publish = t.steps, time.monotonic()
        if not all_finite(t.head):
            return
        if self.config.guard and t.holdout and self.version > 0:
            cand, active = t.evaluate(t.head), t.evaluate(self.published)
            self.guard_scores = {"candidate": cand, "active": active}
            if cand < active - 1e-3:
                self.rejected_candidates += 1
                return
        self.previous = (self.version, copy.deepcopy(self.published))
        self.published.load_state_dict(t.head.state_dict())
        self.version += 1
        publish(self.proposer, self.published, self.version, self.stream)

    # ------------------------------------------------------------ control
    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    # ------------------------------------------------------------ persistence (resumable learning)
    def _locked_work(self) -> bool:
        with self._state_lock:
            return self._work()

    def save(self, path) -> str:
        """Weights + trainer state (optimizer, vocabulary counts, steps, replay sample), from a
        snapshot copied under the trainer lock, written file-by-file atomically outside it."""
        with self._state_lock:
            t = self.trainer
            snap = checkpoint.snapshot_training(
                self.published, t.head, t.opt, self.vocab.counts, self.version, t.steps,
                {"tokens_trained": t.tokens_trained, "vocab_built_at": self._vocab_built_at},
                t.replay, t.holdout)
        meta = {"feature_layers": list(self.engine.runner.feature_layers)}
        return str(checkpoint.save_training(path, snap, meta))

    def load_state(self, path) -> dict:
        """Resume from `save(path)`: weights into the trainer, the published copy and both serving
        slots; optimizer, vocabulary counts, steps and version continue. Refuses a checkpoint whose
        head shape or vocabulary map does not fit (ValueError); changes nothing in that case."""
        runner = self.engine.runner
        head, meta, state = checkpoint.load_training(path, runner, self.published)
        with self._state_lock:
            t = self.trainer
            self.published.load_state_dict(head.state_dict())
            t.head.load_state_dict(state["trainer_head"] if state else head.state_dict())
            t.opt = t._make_opt()
            if state:
                t.opt.load_state_dict(state["optimizer"])
                self.vocab.counts = state["counts"]
                t.steps = state["steps"]
                t.tokens_trained = int(state["extra"].get("tokens_trained", 0))
                self._vocab_built_at = int(state["extra"].get("vocab_built_at", -1))
                t.replay, t.holdout = state["replay"], state["holdout"]
            else:
                t.steps = int(meta.get("trainer_steps", 0))
            self._steps_at_publish = t.steps
            self.version = int(meta.get("version", 0))
            if meta.get("feature_layers"):
                runner.feature_layers = tuple(meta["feature_layers"])
            for slot in self.proposer.slots:
                copy_into(slot, self.published)
            with self.proposer._lock:
                self.proposer.version, self.proposer._staged = self.version, None
            self.previous = None
        return {"version": self.version, "steps": t.steps, "training_state": state is not None}

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        t = self.trainer
        return {
            "steps": t.steps, "losses": dict(t.last_losses), "loss": t.last_losses.get("total"),
            "tokens_trained": t.tokens_trained, "swaps": self.swaps, "rollbacks": self.rollbacks,
            "version": self.version, "serving_version": self.proposer.version,
            "rejected_candidates": self.rejected_candidates, "nonfinite_skips": t.skipped_nonfinite,
            "nonfinite_restores": self.nonfinite_restores, "guard": dict(self.guard_scores),
            "live_tau": {v: s[1] / s[0] for v, s in self.live.items() if s[0]},
            "staleness": self.version - self.proposer.version,
            "replay": len(t.replay), "holdout": len(t.holdout),
            "paused": self.paused, "error": self.error, "alive": self._thread.is_alive(),
        }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

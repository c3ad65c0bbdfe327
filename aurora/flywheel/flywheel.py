"""The flywheel: traces -> ring buffer -> background trainer -> guarded hot swap.

Attaches to an `Engine` through its hooks: a step hook collects traces, a finish hook
seals them into the ring buffer, and a step-boundary hook flips weight slots. Training
runs in its own thread. GPU: its own CUDA stream. CPU: serving and training take turns with
all cores (`share.py`). When the engine is idle (no step for `idle_grace_s`: a back-to-back
client's next request arrives within milliseconds and must not wait out a unit started in
that gap) the trainer trains back to back. While serving has work it takes turns only if idle
time did not already give it its busy share of recent wall time, and then at most that share.
After `max_passes` passes over its replay with nothing new it sleeps.

The busy share is earned. Trainer time under load costs serving that fraction of its tokens
now; a better draft repays it only through a higher τ later. So each guard verdict moves the
share s: the candidate beat the active draft by at least `earn_gain` (relative, on the recent
held-back traces) -> s doubles, up to `busy_share`; otherwise s halves, down to
`min_busy_share`. Roughly: at s = 0.15, a 1 % gain per ~30 s publish interval repays its cost
after ~15 intervals of serving with the better draft. A draft that stopped improving (a
converged one, or a day-0 draft on familiar traffic) costs loaded serving ~`min_busy_share`,
not `busy_share`; idle time is never limited. A draft from scratch starts at `busy_share`; a
saved one (`eagle:<dir>`, e.g. the day-0 draft) starts at `min_busy_share` and earns its way
up. Measured on the demo stream from the day-0 draft (back to back, batch 1): starting at 0.15,
the trainer took 0.13-0.42 s of each of the first ten ~1.5 s requests for 3 optimizer steps,
and those requests ran at 0.78-1.20x `ngram`'s tok/s (median 0.90) before the first verdicts
cut the share.

Guard and rollback score drafts on the same recent held-back traces (with the stored target
distribution), within `guard_share` of trainer time. A trainer crash stops training only.
"""
from __future__ import annotations

import copy
import logging
import threading
import time

import torch

from aurora.config import TrainerConfig
from aurora.flywheel import checkpoint
from aurora.flywheel.share import ShareBudget
from aurora.flywheel.traces import RingBuffer, TraceCollector
from aurora.flywheel.trainer import Trainer
from aurora.flywheel.vocab import VocabCounter, init_from_target, remap_head
from aurora.flywheel.weights import all_finite, copy_into, publish

log = logging.getLogger("aurora.flywheel")
VOCAB_REBUILD_EVERY = 100    # optimizer steps
VOCAB_FIRST_RECORDS = 4      # first rebuild once this many records were seen


class Flywheel:
    def __init__(self, engine, config: TrainerConfig):
        self.engine = engine
        self.config = config
        proposer = engine.proposer
        self.proposer = getattr(proposer, "learned", None) or proposer
        # a draft from scratch only: a saved one (the corpus day-0 draft is saved at version 0)
        # keeps the LM head and norm it was trained with
        if config.init_from_target and not getattr(self.proposer, "pretrained", False):
            for slot in getattr(self.proposer, "slots", [self.proposer.head]):
                init_from_target(slot, engine.runner)
        self.buffer = RingBuffer(config.buffer_bytes)
        self.collector = TraceCollector(self.buffer, top_k=config.top_k, keep_prompt_hidden=config.distil_prompt)
        self.trainer = Trainer(self.proposer.head, engine.runner, config)
        self.published = copy.deepcopy(self.trainer.head).eval().requires_grad_(False)
        self.previous = None                       # (version, weights, swap time) before the latest swap
        self.vocab = VocabCounter(engine.runner.vocab_size)
        self.version = self.proposer.version
        self.swaps = self.rollbacks = self.rejected_candidates = self.nonfinite_restores = 0
        self.vocab_rebuilds = self.num_requests = 0
        self.live: dict[int, list[int]] = {}       # version -> [decode steps, tokens] (reported, not judged)
        self.guard_scores: dict[str, float] = {}
        self.guard_s = self.busy_s = 0.0
        self.error: str | None = None
        self.paused = False
        self._in_unit = False                      # a unit of work is queued or running
        self.sleeping = False
        self._closed = False
        self._started = time.monotonic()
        self._last_publish = time.monotonic()
        self._steps_at_publish = 0
        self._vocab_built_at = -1
        self._state_lock = threading.Lock()        # held by the trainer per unit of work; save/load take it
        self.stream = torch.cuda.Stream() if engine.device.type == "cuda" else None
        # CPU: the trainer thread only schedules; each unit of work runs on the engine's worker
        # thread between two steps (turns with serving, one OpenMP pool; see Engine)
        self.on_worker = engine.device.type == "cpu"
        # trainer compute over recent wall time; .share is earned (module docstring). A saved draft
        # starts at the floor: it already learned what general traffic teaches, and until a guard
        # verdict shows training beating it, each share of busy serving buys nothing.
        pretrained = getattr(self.proposer, "pretrained", False)
        self.budget = ShareBudget(self._floor_share() if pretrained else config.busy_share)
        self.share_cuts = 0                            # guard verdicts that halved the busy share
        self.yielded_turns = 0                         # turns not taken: idle time already gave the share
        engine.step_hooks.append(self._on_step)
        engine.finish_hooks.append(self._on_finish)
        engine.before_step.append(self._at_boundary)
        engine.stats_extra["trainer"] = self.stats
        engine.stats_extra["buffer"] = self.buffer.stats
        self._thread = threading.Thread(target=self._run, name="aurora-trainer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ engine side
    def _on_step(self, view) -> None:
        self.collector.on_step(view)
        live = self.live.setdefault(view.draft_version, [0, 0])
        for tree, (path, _) in zip(view.trees, view.outcomes):
            if tree is not None:
                live[0] += 1
                live[1] += len(path) + 1

    def _on_finish(self, seq) -> None:
        self.num_requests += 1
        self.collector.on_finish(seq)

    def _at_boundary(self) -> None:
        if self.proposer.flip():
            self.swaps += 1

    # ------------------------------------------------------------ trainer thread
    def _serving_busy(self) -> bool:
        """CPU: any engine sharing the compute thread has work or stepped within `idle_grace_s`
        (the gap before a back-to-back client's next request is not idle time)."""
        if self.on_worker:
            return self.engine.machine_idle_s() <= self.config.idle_grace_s   # 0 while serving has work
        return self.engine.has_work()

    def _run(self) -> None:
        shared = self.on_worker                      # CPU: turns with serving on the worker thread
        try:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else _Null()
            with ctx:
                last, was_busy = time.monotonic(), True
                while not self._closed:
                    now = time.monotonic()
                    busy = self._serving_busy()
                    if not busy and not was_busy and not self.paused:   # idle at both looks: idle in between
                        self.budget.offered(now - last)
                    last, was_busy = now, busy
                    self._in_unit = True                      # before the check: see pause(wait=True)
                    if self.paused:
                        self._in_unit = False
                        time.sleep(0.05)
                        continue
                    limited = shared and busy and self.config.busy_share < 1
                    if limited and not self.budget.allows():
                        self._in_unit = False
                        self.yielded_turns += 1               # idle time already gave it its share
                        time.sleep(0.02)
                        continue
                    try:
                        if shared:
                            try:
                                worked, dt = self.engine.run_on_worker(self._timed_work)
                            except RuntimeError:
                                if self._closed or self.engine.closed:
                                    return
                                raise
                        else:
                            worked, dt = self._timed_work()
                    finally:
                        self._in_unit = False
                    self.sleeping = not worked
                    if not worked:
                        time.sleep(0.05)
                        continue
                    self.busy_s += dt
                    self.budget.record(dt)
                    if limited:
                        self._yield_to_serving(dt * (1 / self.budget.share - 1))
        except Exception as exc:                    # serving continues with the last good draft
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("flywheel trainer crashed; training stopped, serving continues")

    def _timed_work(self) -> tuple[bool, float]:
        """One unit of work and its compute seconds (on CPU: on the engine's worker thread, with
        `TrainerConfig.threads` torch threads when set, else the serving threads)."""
        threads = self.config.threads if self.on_worker else 0
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            return self._locked_work(), time.perf_counter() - t0
        finally:
            if threads:
                torch.set_num_threads(before)

    def _yield_to_serving(self, seconds: float) -> None:
        """Sleep up to `seconds` while serving has work; return early when the engine goes idle."""
        end = time.perf_counter() + seconds
        while not self._closed and time.perf_counter() < end and self._serving_busy():
            time.sleep(min(0.02, max(0.0, end - time.perf_counter())))

    def _work(self) -> bool:
        records = self.buffer.drain()
        if records:
            for rec in records:
                self.vocab.update(rec.token_ids)
            self.trainer.add_records(records)
        t = self.trainer
        if not t.mid_micro_batch and t.num_records >= VOCAB_FIRST_RECORDS and (
                self._vocab_built_at < 0 or t.steps - self._vocab_built_at >= VOCAB_REBUILD_EVERY):
            self._rebuild_vocab()
        seen = (t.steps, t.skipped_nonfinite)
        stepped = t.train_step()
        if not stepped:                    # nothing changed the weights: a no-op unit stays cheap
            return bool(records)
        # weights change only at optimizer steps; a non-finite loss or gradient may mean they broke
        if (t.steps, t.skipped_nonfinite) != seen and not all_finite(t.head):
            self.nonfinite_restores += 1
            log.warning("flywheel: non-finite trainer weights; restoring last published draft")
            t.head.load_state_dict(self.published.state_dict())
            t.reset_optimizer()
            return True
        # due after publish_every_steps optimizer steps, or publish_every_s with at least one: a unit
        # of work that ended no optimizer step leaves the weights as published, and publishing them
        # again would swap identical weights (each swap drops every sequence's cached draft context)
        due = t.steps > self._steps_at_publish and (
            t.steps - self._steps_at_publish >= self.config.publish_every_steps
            or time.monotonic() - self._last_publish >= self.config.publish_every_s)
        if due:
            self._maybe_publish()
        return True

    def _rebuild_vocab(self) -> None:
        head = self.trainer.head
        self._vocab_built_at = self.trainer.steps
        if len(head.d2t) >= self.engine.runner.vocab_size:
            return
        new = self.vocab.top(len(head.d2t), head.d2t.cpu())
        if torch.equal(new, head.d2t.cpu()):
            return
        source = self.engine.runner.lm_head.weight if self.config.init_from_target else None
        kept = remap_head(head, new, source)
        self.trainer.reset_optimizer()
        self.vocab_rebuilds += 1
        log.info("flywheel: draft vocabulary rebuilt (%.0f%% rows kept)", 100 * kept)

    # ------------------------------------------------------------ guard, publish, rollback
    def _guard_affordable(self) -> bool:
        spent = self.guard_s
        return spent <= self.config.guard_share * (self.trainer.train_s + spent)

    def _maybe_publish(self) -> None:
        t = self.trainer
        self._steps_at_publish, self._last_publish = t.steps, time.monotonic()
        if not all_finite(t.head):
            return
        if self.config.guard:
            if not t.holdout or not self._guard_affordable():
                return                                         # publish later, once it can be judged
            g0 = time.perf_counter()
            try:
                windows = t.eval_windows()
                cand, active = t.evaluate(t.head, windows), t.evaluate(self.published, windows)
                self.guard_scores = {"candidate": cand, "active": active}
                self._earn(cand, active)
                restored = self._rollback_target(windows, cand, active)
                if restored is not None:
                    self._roll_back(restored)
                    return
            finally:
                self.guard_s += time.perf_counter() - g0
            if cand < active - 1e-3:
                self.rejected_candidates += 1
                return
        self._publish(t.head)

    def _earn(self, cand: float, active: float) -> None:
        """Move the busy share by one guard verdict (module docstring): x2 when the candidate
        beats the active draft by `earn_gain` relative, else /2; within [min_busy_share, busy_share]."""
        c, budget = self.config, self.budget
        if c.busy_share >= 1 or not active > 0:            # unlimited, or nothing judged (nan)
            return
        if cand >= active * (1 + c.earn_gain):
            budget.share = min(c.busy_share, 2 * budget.share)
        else:
            floor = self._floor_share()
            if budget.share > floor:
                self.share_cuts += 1
            budget.share = max(floor, budget.share / 2)

    def _floor_share(self) -> float:
        """The lowest busy share: while training stops earning, and a saved draft's first."""
        return min(self.config.min_busy_share, self.config.busy_share)

    def _rollback_target(self, windows, cand: float, active: float):
        """The weights to roll back to, or None. Rolls back when the active draft scores below
        the one it replaced on held-back traces served since the swap, and the candidate does
        not fix it. Judged once per swap, on the same traces as the guard (not live tau)."""
        prev = self.previous
        if prev is None or self.config.rollback_drop <= 0:
            return None
        if not any(rec.created > prev[2] for rec, _, _ in windows):
            return None                                        # no traffic since the swap yet
        before = self.trainer.evaluate(prev[1], windows)
        self.guard_scores["previous"] = before
        self.previous = None
        floor = before * (1 - self.config.rollback_drop)
        return prev[1] if active < floor and cand < floor else None

    def _roll_back(self, restored) -> None:
        """Republish the pre-swap weights and restart training from them."""
        log.warning("flywheel: v%d scores below its predecessor on recent traces; rolling back", self.version)
        self.trainer.head.load_state_dict(restored.state_dict())
        self.trainer.reset_optimizer()
        self._publish(restored, keep_previous=False)
        self.rollbacks += 1

    def _publish(self, head, keep_previous: bool = True) -> None:
        prev = copy.deepcopy(self.published)
        self.previous = (self.version, prev, time.monotonic()) if keep_previous else None
        self.published.load_state_dict(head.state_dict())
        self.version += 1
        publish(self.proposer, self.published, self.version, self.stream)

    # ------------------------------------------------------------ control
    def pause(self, wait: bool = False, timeout: float = 60.0) -> None:
        """Take no further turns. `wait`: also return only once a unit of work already queued or
        running has finished (a benchmark timing another system next must not pay for it). Never
        wait from the engine's worker thread: a queued unit runs there."""
        self.paused = True
        self.budget.pause()
        end = time.monotonic() + timeout
        while wait and self._in_unit and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.002)

    def resume(self) -> None:
        """Take turns again. The share budget's clock ran only while not paused (ShareBudget.pause)."""
        self.budget.resume()
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
            t.reset_optimizer()                # also drops a half-done micro-batch
            t.head.load_state_dict(state["trainer_head"] if state else head.state_dict())
            if state:
                t.opt.load_state_dict(state["optimizer"])
                self.vocab.counts = state["counts"]
                t.steps = state["steps"]
                t.tokens_trained = int(state["extra"].get("tokens_trained", 0))
                self._vocab_built_at = int(state["extra"].get("vocab_built_at", -1))
                t.restore_records(state["replay"], state["holdout"])
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
        wall = max(1e-9, time.monotonic() - self._started)
        return {
            "steps": t.steps, "losses": dict(t.last_losses), "loss": t.last_losses.get("total"),
            "tokens_trained": t.tokens_trained, "requests": self.num_requests,
            "tokens_trained_per_request": t.tokens_trained / max(1, self.num_requests),
            "prompt_rows_distilled": t.rows_distilled,
            "busy_fraction": self.busy_s / wall, "recent_fraction": self.budget.fraction(),
            "busy_share": self.budget.share, "share_cuts": self.share_cuts,
            "train_s": t.train_s, "guard_s": self.guard_s,
            "guard_fraction": self.guard_s / max(1e-9, t.train_s + self.guard_s),
            "passes": t.passes, "sleeping": self.sleeping,
            "swaps": self.swaps, "rollbacks": self.rollbacks,
            "version": self.version, "serving_version": self.proposer.version,
            "rejected_candidates": self.rejected_candidates, "nonfinite_skips": t.skipped_nonfinite,
            "nonfinite_restores": self.nonfinite_restores, "guard": dict(self.guard_scores),
            "vocab_rebuilds": self.vocab_rebuilds, "open_traces": self.collector.open_requests(),
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

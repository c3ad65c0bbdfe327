"""CPU sharing between serving and the trainer: turns, never oversubscription.

On a small CPU, a trainer thread computing next to a serving step that uses every core
stalls the step's OpenMP barriers (each parallel region waits for its slowest thread), so
the two take turns instead: the engine enters the gate around each step, the trainer
around each unit of work; a waiting trainer gets the next turn (no starvation), and its
share of wall time while serving is busy is bounded by the flywheel (`busy_share`).
Idle time is spent first: `ShareBudget` counts the trainer's compute over a recent window,
and while it already reached `busy_share` of that window (from idle time) the trainer does
not take turns from busy serving at all; only under sustained load does it take its share.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager


class ShareBudget:
    """Trainer compute seconds over the last `window_s` of wall time; `allows()` while they stay
    below `share` of that window (of the time since start, before a whole window passed)."""

    def __init__(self, share: float, window_s: float = 30.0, clock=time.monotonic):
        self.share, self.window_s, self.clock = share, window_s, clock
        self._start = clock()
        self._units: deque = deque()       # (end time, seconds)
        self._sum = 0.0

    def record(self, seconds: float) -> None:
        self._units.append((self.clock(), seconds))
        self._sum += seconds

    def fraction(self) -> float:
        now = self.clock()
        while self._units and self._units[0][0] < now - self.window_s:
            self._sum -= self._units.popleft()[1]
        return self._sum / max(1e-6, min(self.window_s, now - self._start))

    def allows(self) -> bool:
        return self.fraction() < self.share


class ComputeShare:
    def __init__(self):
        self._cv = threading.Condition()
        self._serving = self._training = self._want = False
        self._serve_waiting = 0        # steps waiting for the trainer's unit to end

    # serving side: `with share:` around each engine step
    def __enter__(self):
        with self._cv:
            self._serve_waiting += 1
            while self._training or self._want:
                self._cv.wait()
            self._serve_waiting -= 1
            self._serving = True
            self._cv.notify_all()
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._serving = False
            self._cv.notify_all()
        return False

    @contextmanager
    def train_turn(self):
        """The trainer's turn: a step that waited for the trainer's last unit goes first; then it
        waits for the current step to end, and the next step waits for it."""
        with self._cv:
            while self._serve_waiting:
                self._cv.wait()
            self._want = True
            while self._serving:
                self._cv.wait()
            self._want, self._training = False, True
        try:
            yield
        finally:
            with self._cv:
                self._training = False
                self._cv.notify_all()

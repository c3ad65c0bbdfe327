"""CPU sharing between serving and the trainer: turns, never oversubscription.

On a small CPU, a trainer computing next to a serving step that uses every core stalls the
step's OpenMP barriers, and a second thread with its own OpenMP pool makes every pool's
barriers sleep instead of spin (see `Engine`). So the trainer's units of work run on the
engine's worker thread between two steps (`Engine.run_on_worker`): a waiting unit gets the
next turn, and its share of wall time while serving is busy is bounded by the flywheel
(`busy_share`). Idle time is spent first: `ShareBudget` counts the trainer's compute over a recent window,
and while it already reached `busy_share` of that window (from idle time) the trainer does
not take turns from busy serving at all; only under sustained load does it take its share.
"""
from __future__ import annotations

import time
from collections import deque


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

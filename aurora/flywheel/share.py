"""CPU sharing between serving and the trainer: turns, never oversubscription.

On a small CPU, a trainer computing next to a serving step that uses every core stalls the
step's OpenMP barriers, and a second thread with its own OpenMP pool makes every pool's
barriers sleep instead of spin (see `Engine`). So the trainer's units of work run on the
engine's worker thread between two steps (`Engine.run_on_worker`): a waiting unit gets the
next turn, and its share of wall time while serving is busy is bounded by `share` (earned by
the flywheel's guard verdicts). Idle time is spent first: `ShareBudget` counts, over a recent
window, the trainer's compute and the idle time serving left it. While either reached `share` of
that window, the trainer takes no turns from busy serving: it trained enough, or it was offered
enough idle time (and, having nothing left to do then, slept). Only under sustained load, when
idle time is scarce, does it take its share from serving.
"""
from __future__ import annotations

import time
from collections import deque


class ShareBudget:
    """Trainer compute seconds over the last `window_s` of wall time; `allows()` while they stay
    below `share` of that window (of the time since start, before a whole window passed)."""

    def __init__(self, share: float, window_s: float = 30.0, clock=time.monotonic):
        self.share, self.window_s, self.clock = share, window_s, clock
        self._paused_s, self._paused_at = 0.0, None
        self._start = clock()
        self._units: deque = deque()       # (end time, trainer seconds)
        self._sum = 0.0
        self._idle: deque = deque()        # (end time, idle seconds offered)
        self._idle_sum = 0.0

    def pause(self) -> None:
        """Stop the budget's clock: wall time while the trainer is paused (another system serving,
        in a benchmark) is neither credit for a burst of training afterwards nor idle time."""
        if self._paused_at is None:
            self._paused_at = self.clock()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += self.clock() - self._paused_at
            self._paused_at = None

    def _now(self) -> float:
        """Wall time with paused stretches taken out."""
        now = self.clock() if self._paused_at is None else self._paused_at
        return now - self._paused_s

    def record(self, seconds: float) -> None:
        self._units.append((self._now(), seconds))
        self._sum += seconds

    def offered(self, seconds: float) -> None:
        """`seconds` of wall time in which serving had no work (whether or not the trainer used it)."""
        self._idle.append((self._now(), seconds))
        self._idle_sum += seconds

    def _span(self, now: float) -> float:
        return max(1e-6, min(self.window_s, now - self._start))

    def fraction(self) -> float:
        """Trainer compute / recent wall time."""
        now = self._now()
        while self._units and self._units[0][0] < now - self.window_s:
            self._sum -= self._units.popleft()[1]
        return self._sum / self._span(now)

    def idle_fraction(self) -> float:
        """Idle time offered / recent wall time."""
        now = self._now()
        while self._idle and self._idle[0][0] < now - self.window_s:
            self._idle_sum -= self._idle.popleft()[1]
        return self._idle_sum / self._span(now)

    def allows(self) -> bool:
        return self.fraction() < self.share and self.idle_fraction() < self.share

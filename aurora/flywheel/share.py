"""CPU sharing between serving and the trainer: turns, never oversubscription.

On a small CPU, a trainer thread computing next to a serving step that uses every core
stalls the step's OpenMP barriers (each parallel region waits for its slowest thread), so
the two take turns instead: the engine enters the gate around each step, the trainer
around each unit of work; a waiting trainer gets the next turn (no starvation), and its
share of wall time while serving is busy is bounded by the flywheel (`busy_share`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class ComputeShare:
    def __init__(self):
        self._cv = threading.Condition()
        self._serving = self._training = self._want = False

    # serving side: `with share:` around each engine step
    def __enter__(self):
        with self._cv:
            while self._training or self._want:
                self._cv.wait()
            self._serving = True
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._serving = False
            self._cv.notify_all()
        return False

    @contextmanager
    def train_turn(self):
        """The trainer's turn: waits for the current step to end; the next step waits for it."""
        with self._cv:
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

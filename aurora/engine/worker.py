"""One compute thread per process: every engine's loading, compiling, steps and CPU training run on it.

Why one: torch's CPU kernels parallelise with OpenMP (libgomp), which keeps a pool of threads per
thread that ever ran a parallel region. Once the pools' threads outnumber the cores, libgomp
throttles waiting: every barrier of every pool sleeps in the kernel instead of spinning, and a
model step is a few thousand barriers. Measured on 2 cores, SmolLM2-135M, batch 8: a forward of
45 ms on the thread that loaded the model took 77 ms on a second thread while the first one's
pool lived; the same held in eager mode (55 vs 102 ms). So the process computes on one thread:

    loop:  run queued jobs (engine boots, `Engine.run_on_worker` calls)
           for each registered engine: one tick (its calls, its inbox, one step if it has work)
           nothing to do -> wait for a wake-up (new request, new job) or 50 ms

Engines in one process (a benchmark comparing drafts, tests) take turns step by step, the way
they would share the cores anyway, without oversubscribing them.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

import torch

THREAD_NAME = "aurora-engine"


class ComputeThread:
    _instance: "ComputeThread | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> "ComputeThread":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self.engines: list = []
        self.wake = threading.Event()
        self._jobs: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.last_step = time.monotonic()          # when a serving step last ended (any engine)
        self.thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self.thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, fn, *args):
        """fn(*args) on the compute thread between two ticks; its result or its exception."""
        return self.submit(self._jobs, self._lock, fn, args)

    def submit(self, jobs: collections.deque, lock: threading.Lock, fn, args: tuple, refuse=None):
        """fn(*args) through the queue `jobs` (drained on this thread by `run_jobs`); blocks for its
        result or exception. On this thread fn just runs. `refuse()`, checked under `lock`, returns
        a reason to raise instead of queueing (a closed engine), or None."""
        if self.on_thread():
            return fn(*args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with lock:
            why = refuse() if refuse is not None else None
            if why:
                raise RuntimeError(why)
            jobs.append((fn, args, future))
        self.wake.set()
        return future.result()

    def register(self, engine) -> None:
        self.call(self.engines.append, engine)

    def unregister(self, engine) -> None:
        """After this returns, no tick of `engine` is running or will run."""
        self.call(lambda: engine in self.engines and self.engines.remove(engine))

    def busy(self) -> bool:
        """Whether any engine on this thread has requests to serve (a trainer of an idle engine
        must not take the machine from another engine's serving)."""
        return any(engine.has_work() for engine in list(self.engines))

    def idle_s(self) -> float:
        """Seconds since serving last stepped; 0 while any engine has requests. A client sending
        its next request right after the last one finished leaves a gap of milliseconds: a trainer
        that took that gap for idle time would make the request wait out its whole unit."""
        return 0.0 if self.busy() else max(0.0, time.monotonic() - self.last_step)

    def _loop(self) -> None:
        while True:
            run_jobs(self._jobs, self._lock)
            busy = False
            for engine in list(self.engines):
                threads = engine.serve_threads()
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                busy = engine.tick() or busy
            if busy:
                self.last_step = time.monotonic()
            else:
                self.wake.wait(0.05)
                self.wake.clear()


def run_jobs(jobs: collections.deque, lock: threading.Lock) -> None:
    """Run queued (fn, args, Future) jobs in order, each future getting fn's result or exception."""
    while True:
        with lock:
            if not jobs:
                return
            fn, args, future = jobs.popleft()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

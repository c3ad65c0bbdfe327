"""Progress for slow one-time steps: a heartbeat line every few seconds while a block runs,
so model conversion, engine loading or a warm-up on a busy CPU never looks like a hang."""
from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def heartbeat(say, what: str, every_s: float = 10.0):
    """Call `say(what, seconds_so_far)` every `every_s` seconds while the block runs; yields a
    function returning the seconds elapsed (for a closing line)."""
    done = threading.Event()
    start = time.monotonic()

    def beat():
        while not done.wait(every_s):
            say(what, time.monotonic() - start)
    thread = threading.Thread(target=beat, name="aurora-heartbeat", daemon=True)
    thread.start()
    try:
        yield lambda: time.monotonic() - start
    finally:
        done.set()
        thread.join()

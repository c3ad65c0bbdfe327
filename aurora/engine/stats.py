"""Engine-wide counters: accepted length tau, acceptance per draft depth, timing split."""
from __future__ import annotations

import time
from collections import deque


class EngineStats:
    def __init__(self, max_depth: int = 32, window: int = 256):
        self.start = time.perf_counter()
        self.num_requests = 0
        self.num_finished = 0
        self.num_errors = 0
        self.num_steps = 0                  # target forwards
        self.num_seq_steps = 0              # decode steps summed over sequences
        self.num_decode_tokens = 0
        self.num_tokens = 0                 # all generated tokens (incl. the prefill one)
        self.num_prompt_tokens = 0
        self.num_preemptions = 0
        self.num_forward_retries = 0        # target forwards retried (smaller, or without trees)
        self.attempts = [0] * (max_depth + 1)
        self.accepts = [0] * (max_depth + 1)
        self.draft_s = 0.0
        self.verify_s = 0.0
        self.busy_s = 0.0
        self.recent_tau = deque(maxlen=window)   # per decode step: tokens emitted

    def record_tree(self, max_depth: int, accepted: int, emitted: int) -> None:
        self.num_seq_steps += 1
        self.num_decode_tokens += emitted
        self.recent_tau.append(emitted)
        for d in range(1, min(max_depth, len(self.attempts) - 1) + 1):
            if accepted >= d - 1:
                self.attempts[d] += 1
                self.accepts[d] += accepted >= d

    def snapshot(self) -> dict:
        by_depth = {d: self.accepts[d] / self.attempts[d] for d in range(1, len(self.attempts))
                    if self.attempts[d]}
        tau = self.num_decode_tokens / self.num_seq_steps if self.num_seq_steps else 1.0
        recent = sum(self.recent_tau) / len(self.recent_tau) if self.recent_tau else tau
        return {
            "accepted_length": tau,
            "accepted_length_recent": recent,
            "acceptance_by_depth": by_depth,
            "tokens_per_s": self.num_tokens / self.busy_s if self.busy_s else 0.0,
            "num_tokens": self.num_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_steps": self.num_steps,
            "num_requests": self.num_requests,
            "num_finished": self.num_finished,
            "num_errors": self.num_errors,
            "num_preemptions": self.num_preemptions,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "busy_s": self.busy_s,
            "uptime_s": time.perf_counter() - self.start,
        }

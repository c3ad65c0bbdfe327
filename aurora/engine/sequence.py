"""Per-request state, plain Python: token ids, KV bookkeeping, stop checks, stats."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from aurora.types import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    callback: object = None                 # callable(RequestOutput) run on the engine thread
    token_ids: list[int] = field(default_factory=list)   # prompt + generated
    num_cached: int = 0                     # tokens whose KV is in the cache
    num_scheduled: int = 0                  # uncached tokens run this step (< num_uncached: a prompt chunk)
    block_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    num_steps: int = 0                      # decode steps (target forwards after prefill)
    num_decode_tokens: int = 0              # tokens emitted by those steps
    num_preemptions: int = 0
    draft_version: int = 0
    features: torch.Tensor | None = None    # [W, 3*hidden] target features of the last cached positions
    emitted_text: str = ""
    num_emitted: int = 0
    text: str = ""                          # detokenised output so far (see engine/detok.py)
    detok_prefix: int = 0                   # output offsets: decode restarts at prefix, text final to read
    detok_read: int = 0
    draft_state: dict = field(default_factory=dict)
    num_prefix_cached: int = 0              # tokens whose KV came from the prefix cache at admission
    num_registered: int = 0                 # leading blocks offered to the prefix cache
    prefix_keys: list = field(default_factory=list)   # chain keys of the leading full blocks

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def num_step_tokens(self) -> int:
        """Uncached tokens the next forward runs: the scheduled chunk, else all of them."""
        n = self.num_uncached
        return self.num_scheduled if 0 < self.num_scheduled < n else n

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def stats(self) -> dict:
        n = self.num_output
        elapsed = time.perf_counter() - self.arrival
        return {
            "num_tokens": n,
            "num_prompt_tokens": self.num_prompt,
            "num_steps": self.num_steps,
            "accepted_length": self.num_decode_tokens / self.num_steps if self.num_steps else 1.0,
            "draft_version": self.draft_version,
            "num_preemptions": self.num_preemptions,
            "ttft_s": (self.first_token_time - self.arrival) if self.first_token_time else None,
            "latency_s": elapsed,
        }

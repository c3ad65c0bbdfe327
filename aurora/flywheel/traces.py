"""Traces: what verification already computed, collected per request, in a byte-bounded ring.

A `TraceRecord` holds a finished request's tokens, the target features and last hidden
state of every cached position, and the first rejected nodes of each verified tree
(their parent position, token and the target's hidden state at the node). Nothing is
recomputed on the serving path: rows are sliced and copied (fp16, CPU).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

STORE_DTYPE = torch.float16


@dataclass
class TraceRecord:
    request_id: str
    token_ids: list[int]                  # prompt + generated
    features: torch.Tensor                # [n, 3*hidden] target features of positions 0..n-1
    hidden: torch.Tensor                  # [n, hidden] target last hidden of positions 0..n-1
    rejected: list[tuple[int, int, int]]  # (depth, parent position, token) of first-rejected nodes
    rejected_hidden: torch.Tensor | None  # [R, hidden] target hidden at those nodes
    num_steps: int = 0
    num_accepted: int = 0
    draft_version: int = 0
    created: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        n = self.features.nbytes + self.hidden.nbytes + 16 * len(self.token_ids)
        return n + (self.rejected_hidden.nbytes if self.rejected_hidden is not None else 0)


class RingBuffer:
    """Bounded in bytes; drops the oldest record when full (counted); never blocks a writer."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._items: deque[TraceRecord] = deque()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.num_in = self.num_out = self.num_dropped = 0

    def put(self, rec: TraceRecord) -> None:
        with self._lock:
            self.num_in += 1
            if rec.nbytes > self.capacity:
                self.num_dropped += 1
                return
            self._items.append(rec)
            self.nbytes += rec.nbytes
            while self.nbytes > self.capacity:
                old = self._items.popleft()
                self.nbytes -= old.nbytes
                self.num_dropped += 1

    def drain(self, max_items: int | None = None) -> list[TraceRecord]:
        with self._lock:
            n = len(self._items) if max_items is None else min(max_items, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            self.nbytes -= sum(r.nbytes for r in out)
            self.num_out += len(out)
            return out

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        with self._lock:
            now = time.monotonic()
            ages = [now - r.created for r in self._items]
            return {"records": len(self._items), "bytes": self.nbytes, "capacity_bytes": self.capacity,
                    "fill": self.nbytes / self.capacity, "in": self.num_in, "out": self.num_out,
                    "dropped": self.num_dropped, "mean_age_s": sum(ages) / len(ages) if ages else 0.0}


class TraceCollector:
    """Step hook: accumulates per-request rows from each StepView; emits a record at finish."""

    def __init__(self, buffer: RingBuffer, max_positions: int = 1024):
        self.buffer = buffer
        self.max_positions = max_positions
        self._open: dict[str, dict] = {}

    def on_step(self, view) -> None:
        feats_all, hidden_all = view.result.features, view.result.hidden
        for seq, tree, r, (path, _) in zip(view.seqs, view.trees, view.rows, view.outcomes):
            st = self._open.setdefault(seq.request_id, {"f": [], "h": [], "n": 0, "rej": [], "rej_h": [],
                                                         "steps": 0, "acc": 0, "ver": view.draft_version})
            if seq.num_cached != st["n"]:                # preempted and recomputed: restart
                st.update(f=[], h=[], n=0, rej=[], rej_h=[])
                if seq.num_cached != 0:
                    continue
            if st["n"] >= self.max_positions:
                continue
            rows = list(range(r.start, r.start + r.num_uncached))
            rows += [r.start + r.num_uncached + n for n in path]
            idx = torch.tensor(rows, device=feats_all.device)
            st["f"].append(feats_all[idx].to("cpu", STORE_DTYPE))
            st["h"].append(hidden_all[idx].to("cpu", STORE_DTYPE))
            root_pos = seq.num_cached + r.num_uncached - 1
            st["n"] = seq.num_cached + len(rows)
            if tree is not None and len(tree):
                st["steps"] += 1
                st["acc"] += len(path)
                on_path = set(path)
                frontier = [-1] + path                   # nodes whose children were judged
                rej = [n for n in range(len(tree)) if n not in on_path and tree.parents[n] in frontier]
                for n in rej:
                    depth = tree.depths[n]
                    st["rej"].append((depth, root_pos + depth - 1, tree.token_ids[n]))
                if rej:
                    ridx = torch.tensor([r.start + r.num_uncached + n for n in rej], device=hidden_all.device)
                    st["rej_h"].append(hidden_all[ridx].to("cpu", STORE_DTYPE))

    def on_finish(self, seq) -> None:
        st = self._open.pop(seq.request_id, None)
        if st is None or not st["f"] or seq.finish_reason in ("abort", "error"):
            return
        n = min(sum(len(f) for f in st["f"]), len(seq.token_ids) - 1)   # stop may cut an accepted path
        feats, hidden = torch.cat(st["f"])[:n], torch.cat(st["h"])[:n]
        self.buffer.put(TraceRecord(
            request_id=seq.request_id, token_ids=list(seq.token_ids[:n + 1]), features=feats, hidden=hidden,
            rejected=st["rej"], rejected_hidden=torch.cat(st["rej_h"]) if st["rej_h"] else None,
            num_steps=st["steps"], num_accepted=st["acc"], draft_version=st["ver"]))

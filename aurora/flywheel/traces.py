"""Traces: what verification already computed, collected per request, in a byte-bounded ring.

A `TraceRecord` holds a window of a request (the last `max_positions` positions; long
requests are windowed, never dropped): its tokens, the target features of each position
(bf16: fp16 overflows at ~6.5e4, hidden-state outliers go beyond), the target's next-token
distribution at every position verification produced logits for (top-k ids + probs,
computed once per step from the logits the engine already has), and the first-rejected
tree nodes with the target's distribution at each. Training never recomputes the LM head
at those positions.

Prompt positions have features but no logits (prefill computes only the last row's). The
collector keeps their final hidden state h (bf16, [m, hidden]) and the trainer later turns it
into the target's own distribution there, p = softmax(lm_head(h)) (`Trainer.distil_pending`),
off the serving path: every prompt token becomes a training row labelled by the target.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

STORE_DTYPE = torch.bfloat16       # features: fp16's 6.5e4 range is too small for hidden outliers
PROB_DTYPE = torch.float16         # probabilities in [0, 1]: fp16 keeps 3 significant digits
TOP_K = 16                         # target distribution kept per position (ids + probs)


@dataclass
class TraceRecord:
    request_id: str
    token_ids: list[int]                  # tokens of window positions 0..n (row i's next token is i + 1)
    features: torch.Tensor                # [n, 3*hidden] bf16 target features of window positions 0..n-1
    target_ids: torch.Tensor              # [n, K] int32 target top-k ids predicting token i + 1 (-1: none)
    target_probs: torch.Tensor            # [n, K] fp16 their probabilities (0 where no logits were kept)
    rejected: list[tuple[int, int, int]]  # (depth, parent window position, token) of first-rejected nodes
    rejected_ids: torch.Tensor | None = None    # [R, K] int32 target top-k at those nodes
    rejected_probs: torch.Tensor | None = None  # [R, K] fp16
    start: int = 0                        # absolute position of window row 0
    num_steps: int = 0
    num_accepted: int = 0
    draft_version: int = 0
    label_only: torch.Tensor | None = None     # [n] bool: target is the next token alone (see with_prompt_labels)
    prompt_hidden: torch.Tensor | None = None  # [m, hidden] bf16 target final hidden at the m positions without
                                               # a target (in order), to be distilled; None once distilled
    created: float = field(default_factory=time.monotonic)

    @property
    def has_target(self) -> torch.Tensor:
        """[n] bool: positions with a stored target distribution (decode roots and accepted nodes)."""
        return self.target_ids[:, 0] >= 0

    @property
    def nbytes(self) -> int:
        n = self.features.nbytes + self.target_ids.nbytes + self.target_probs.nbytes + 16 * len(self.token_ids)
        if self.rejected_ids is not None:
            n += self.rejected_ids.nbytes + self.rejected_probs.nbytes + 24 * len(self.rejected)
        if self.prompt_hidden is not None:
            n += self.prompt_hidden.nbytes
        return n


def with_prompt_labels(rec: TraceRecord) -> TraceRecord:
    """A copy whose positions without a stored target distribution (the prompt: prefill kept no
    logits) get the next token as a hard label, p = one-hot(token i + 1), marked `label_only`.
    Prompt text is written by the user, not the target, so these rows teach the feature -> token
    mapping (as offline EAGLE training on fixed data does) and are weighted by the trainer."""
    has = rec.has_target
    label = ~has
    label[len(rec.token_ids) - 1:] = False                   # no next token
    if not label.any():
        return rec
    ids, probs = rec.target_ids.clone(), rec.target_probs.clone()
    idx = label.nonzero()[:, 0]
    ids[idx] = -1
    ids[idx, 0] = torch.tensor(rec.token_ids, dtype=ids.dtype)[idx + 1]
    probs[idx] = 0
    probs[idx, 0] = 1
    return replace(rec, target_ids=ids, target_probs=probs, label_only=label)


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


def top_k_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (ids [R, k] int32, probs [R, k] fp16) of softmax(logits) on CPU."""
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(k, probs.shape[-1]), -1)
    return top.indices.to("cpu", torch.int32), top.values.to("cpu", PROB_DTYPE)


class _Open:
    """Per-request collection state: chunks of consecutive committed positions."""
    __slots__ = ("chunks", "start", "next", "rej", "steps", "acc", "ver")

    def __init__(self, version: int):
        self.chunks: deque = deque()   # (features [c, 3h], ids [c, K], probs [c, K], hidden [c', h] | None)
        self.start = 0                 # absolute position of the first kept row
        self.next = 0                  # absolute position of the next row to come
        self.rej: list = []            # (depth, parent position, token, ids [K], probs [K])
        self.steps = self.acc = 0
        self.ver = version

    def rows(self) -> int:
        return self.next - self.start

    def trim(self, cap: int) -> None:
        """Keep the last `cap` positions (a bounded window over long requests)."""
        while self.rows() > cap:
            f, i, p, h = self.chunks[0]
            cut = min(len(f), self.rows() - cap)
            if cut == len(f):
                self.chunks.popleft()
            else:                                   # a chunk's hidden rows are its first rows
                self.chunks[0] = (f[cut:], i[cut:], p[cut:], None if h is None or cut >= len(h) else h[cut:])
            self.start += cut
        self.rej = [r for r in self.rej if r[1] - 1 >= self.start]


class TraceCollector:
    """Step hook: accumulates per-request rows from each StepView; emits a record at finish."""

    def __init__(self, buffer: RingBuffer, max_positions: int = 1024, top_k: int = TOP_K,
                 keep_prompt_hidden: bool = True):
        self.buffer = buffer
        self.max_positions = max_positions
        self.top_k = top_k
        self.keep_prompt_hidden = keep_prompt_hidden     # for the trainer's prompt distillation
        self._open: dict[str, _Open] = {}

    def open_requests(self) -> int:
        return len(self._open)

    def on_step(self, view) -> None:
        res = view.result
        feat_rows, logit_rows, hid_rows, plans = [], [], [], []
        for seq, tree, r, (path, _) in zip(view.seqs, view.trees, view.rows, view.outcomes):
            if seq.finished:                              # failed in verification: nothing to keep
                self._open.pop(seq.request_id, None)
                continue
            st = self._open.get(seq.request_id)
            if st is None or seq.num_cached != st.next:  # new, or preempted and recomputed: restart
                if seq.num_cached != seq.num_prefix_cached:   # (where the prefix cache left off)
                    self._open.pop(seq.request_id, None)
                    continue
                st = self._open[seq.request_id] = _Open(view.draft_version)
                st.start = st.next = seq.num_cached
            m, base = r.num_uncached, r.start + r.num_uncached
            f0 = len(feat_rows)
            feat_rows += range(r.start, base)
            feat_rows += [base + n for n in path]
            l0 = len(logit_rows)
            logit_rows.append(r.logit_start)                              # the root
            logit_rows += [r.logit_start + 1 + n for n in path]           # accepted nodes
            rej = []
            if tree is not None and len(tree):
                on_path, frontier = set(path), set([-1] + path)          # nodes whose children were judged
                rej = [n for n in range(len(tree)) if n not in on_path and tree.parents[n] in frontier]
                logit_rows += [r.logit_start + 1 + n for n in rej]
            h0 = len(hid_rows)
            if self.keep_prompt_hidden:                  # rows without logits: the prompt's (first m - 1)
                hid_rows += feat_rows[f0:len(feat_rows) - 1 - len(path)]
            plans.append((seq, st, tree, path, rej, f0, len(feat_rows), l0, h0, len(hid_rows)))
        if not plans:
            return
        feats = res.features[torch.tensor(feat_rows, device=res.features.device)].to("cpu", STORE_DTYPE)
        ids, probs = top_k_probs(res.logits[torch.tensor(logit_rows, device=res.logits.device)], self.top_k)
        hidden = (res.hidden[torch.tensor(hid_rows, device=res.hidden.device)].to("cpu", STORE_DTYPE)
                  if hid_rows else None)
        for seq, st, tree, path, rej, f0, f1, l0, h0, h1 in plans:
            c = f1 - f0
            n_dist = 1 + len(path)                        # root + accepted nodes are the last rows
            cid = torch.full((c, ids.shape[1]), -1, dtype=torch.int32)
            cpr = torch.zeros(c, ids.shape[1], dtype=PROB_DTYPE)
            cid[c - n_dist:] = ids[l0:l0 + n_dist]
            cpr[c - n_dist:] = probs[l0:l0 + n_dist]
            root_pos = st.next + c - n_dist
            st.chunks.append((feats[f0:f1], cid, cpr, hidden[h0:h1] if h1 > h0 else None))
            st.next += c
            if tree is not None and len(tree):
                st.steps += 1
                st.acc += len(path)
                for j, n in enumerate(rej):
                    depth = tree.depths[n]
                    k = l0 + n_dist + j
                    st.rej.append((depth, root_pos + depth - 1, tree.token_ids[n], ids[k], probs[k]))
            st.trim(self.max_positions)

    def on_finish(self, seq) -> None:
        st = self._open.pop(seq.request_id, None)
        if st is None or not st.chunks:
            return
        n = min(st.rows(), len(seq.token_ids) - 1 - st.start)   # a stop may cut an accepted path
        if n < 2:
            return
        feats = torch.cat([c[0] for c in st.chunks])[:n]
        ids = torch.cat([c[1] for c in st.chunks])[:n]
        probs = torch.cat([c[2] for c in st.chunks])[:n]
        rej = [r for r in st.rej if r[1] - st.start < n]
        hid = [c[3] for c in st.chunks if c[3] is not None]
        hidden = torch.cat(hid) if hid else None
        if hidden is not None and len(hidden) != int((ids[:, 0] < 0).sum()):
            hidden = None                                  # not aligned with the rows it labels: skip
        rec = TraceRecord(
            request_id=seq.request_id, token_ids=list(seq.token_ids[st.start:st.start + n + 1]), features=feats,
            target_ids=ids, target_probs=probs,
            rejected=[(d, pos - st.start, tok) for d, pos, tok, _, _ in rej],
            rejected_ids=torch.stack([r[3] for r in rej]) if rej else None,
            rejected_probs=torch.stack([r[4] for r in rej]) if rej else None,
            start=st.start, num_steps=st.steps, num_accepted=st.acc, draft_version=st.ver, prompt_hidden=hidden)
        self.buffer.put(rec)

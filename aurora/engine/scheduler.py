"""Continuous batching: admit waiting requests by free KV blocks, preempt when short.

Each step every running sequence needs blocks for its uncached tokens plus a draft
tree budget. When blocks run out, the most recently admitted sequence is preempted:
its KV is freed and it is recomputed later (its tokens are kept), so nothing fails.
While some streams decode, prompts advance by at most `prefill_chunk` tokens per step
(shared, oldest first), so a long prompt never stalls the others for its whole prefill.
With a prefix cache (`prefix_cache.py`), an admitted request first shares the cached blocks of
its longest matching prompt prefix and prefills only the rest.
"""
from __future__ import annotations

from collections import deque

from aurora.engine.kv_cache import KVCache, blocks_needed
from aurora.engine.prefix_cache import PrefixCache
from aurora.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cache: KVCache, max_batch: int, prefill_chunk: int = 0, prefix_cache: bool = False):
        self.cache = cache
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefix = PrefixCache(cache.allocator, cache.block_size) if prefix_cache else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._blocked: tuple | None = None         # (head, admission state) at which it last failed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _need(self, seq: Sequence, tree_budget: int) -> int:
        extra = tree_budget if seq.num_uncached == 1 else 0
        return blocks_needed(len(seq.token_ids) + extra, self.cache.block_size) - len(seq.block_ids)

    def _grow(self, seq: Sequence, tree_budget: int) -> bool:
        need = self._need(seq, tree_budget)
        if need <= 0:
            return True
        if need > self.cache.allocator.num_free:
            return False
        seq.block_ids += self.cache.allocator.allocate(need)
        return True

    def _admission_state(self, tree_budget: int) -> tuple:
        """What admitting the waiting head depends on: free (or evictable) blocks, the set of
        cached prefixes, and the tree budget. While it stays the same, a head that could not be
        admitted still cannot, so `schedule` does not re-match (and re-hash) its prefix."""
        epoch = self.prefix.epoch if self.prefix is not None else 0
        return tree_budget, self.cache.allocator.num_free, epoch

    def schedule(self, tree_budget: int) -> list[Sequence]:
        """Return the sequences to run this step, with enough blocks for tokens + tree."""
        for seq in list(self.running):             # keep running ones first, preempting the newest
            if seq not in self.running:
                continue
            while not self._grow(seq, tree_budget):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self._blocked is not None and self._blocked[0] is seq \
                    and self._blocked[1] == self._admission_state(tree_budget):
                break                              # nothing it depends on changed: no re-match
            if self.prefix is not None and not seq.block_ids:
                self.prefix.match(seq)
            if not self._grow(seq, tree_budget):
                if self.prefix is not None:
                    self.prefix.unmatch(seq)
                self._blocked = seq, self._admission_state(tree_budget)
                break
            self._blocked = None
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        return self._budget_tokens(self.running)

    def _budget_tokens(self, running: list[Sequence]) -> list[Sequence]:
        """Set each sequence's `num_scheduled`; prompts share the chunk budget when anyone decodes."""
        decoding = any(s.num_uncached == 1 for s in running)
        budget = self.prefill_chunk if self.prefill_chunk and decoding else None
        out = []
        for seq in running:
            n = seq.num_uncached
            if n > 1 and budget is not None:
                n = min(n, budget)
                budget -= n
            seq.num_scheduled = n
            if n > 0:
                out.append(seq)
        return out

    def commit(self, seq: Sequence) -> None:
        """After a step: offer the blocks whose KV is now committed to the prefix cache."""
        if self.prefix is not None:
            self.prefix.register(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.commit(seq)                          # its prefix survives: the recompute reuses it
        self.release(seq)
        seq.num_cached = seq.num_registered = 0
        seq.features = None
        seq.draft_state.clear()
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.cache.allocator.free(seq.block_ids)
            seq.block_ids = []

    def trim(self, seq: Sequence) -> None:
        """Free blocks beyond what the cached tokens use (dropped draft nodes)."""
        keep = blocks_needed(seq.num_cached, self.cache.block_size)
        if len(seq.block_ids) > keep:
            self.cache.allocator.free(seq.block_ids[keep:])
            seq.block_ids = seq.block_ids[:keep]

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.commit(seq)
        self.release(seq)
        seq.status = Status.FINISHED

"""Prefix cache: reuse the KV of full blocks whose tokens, and every token before them, match.

The KV of position s depends only on tokens 0..s (causal attention), so a full block is named
by a chain key over everything up to its end:

    key_0 = H(tokens[0:B]),   key_i = H(key_{i-1} || tokens[i*B:(i+1)*B])

with H = BLAKE2b-128 (a keyed-quality hash: two different prefixes colliding would hand one
request another's KV, so no 64-bit Python hash). A sequence registers each block once its KV
is committed (every position < num_cached); a new request walks its prompt's keys and shares
the longest run of registered blocks, then prefills only the rest. At least one prompt token
is always left to compute, so a shared block is never written: new tokens, tree nodes and
path compaction all land at positions >= num_cached, in blocks the sequence owns alone.

Blocks nobody owns stay in the allocator's LRU of evictable blocks, still registered, until an
allocation needs them (`BlockAllocator.on_evict` forgets the key). A multi-turn conversation's
next turn, or requests that share a long instruction, skip the prefill of what they share.

Per sequence: `seq.prefix_keys` (keys of its first full blocks, derived from tokens only, so
they survive preemption) and `seq.num_registered` (how many of its blocks were offered).
"""
from __future__ import annotations

import hashlib
from array import array

from aurora.engine.kv_cache import BlockAllocator


def _key(prev: bytes, tokens) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size
        self._block_of: dict[bytes, int] = {}      # chain key -> block holding that KV
        self._key_of: dict[int, bytes] = {}        # block -> its chain key
        allocator.retain = self._key_of.__contains__
        allocator.on_evict = self._forget
        self.num_queries = 0                       # prompt tokens looked up
        self.num_hit_tokens = 0                    # of those, served from the cache
        self.num_evicted = 0                       # cached blocks reclaimed for new KV
        self.epoch = 0                             # changes whenever the set of cached blocks does

    def __len__(self) -> int:
        return len(self._key_of)

    def _forget(self, block: int) -> None:
        """An evictable block is reused: drop its key (keys and blocks map one to one)."""
        del self._block_of[self._key_of.pop(block)]
        self.num_evicted += 1
        self.epoch += 1

    def _keys(self, seq, n: int) -> list[bytes]:
        """The chain keys of seq's first n full blocks (extends seq.prefix_keys as needed)."""
        keys, bs, toks = seq.prefix_keys, self.block_size, seq.token_ids
        for i in range(len(keys), n):
            keys.append(_key(keys[i - 1] if i else b"", toks[i * bs:(i + 1) * bs]))
        return keys

    def match(self, seq) -> int:
        """Share the longest cached run of seq's leading full blocks; returns tokens covered.
        Leaves at least one token uncached (the step needs a row to sample from)."""
        n_max = (len(seq.token_ids) - 1) // self.block_size
        self.num_queries += len(seq.token_ids)
        hits = []
        for key in self._keys(seq, n_max):
            b = self._block_of.get(key)
            if b is None:
                break
            hits.append(b)
        for b in hits:
            self.allocator.share(b)
        seq.block_ids, seq.num_registered = hits, len(hits)
        seq.num_cached = seq.num_prefix_cached = len(hits) * self.block_size
        self.num_hit_tokens += seq.num_cached
        return seq.num_cached

    def unmatch(self, seq) -> None:
        """Undo `match` for a sequence that could not be admitted after all."""
        self.num_hit_tokens -= seq.num_cached
        self.num_queries -= len(seq.token_ids)
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
        seq.block_ids, seq.num_cached, seq.num_registered, seq.num_prefix_cached = [], 0, 0, 0

    def register(self, seq) -> None:
        """Offer seq's blocks whose every position has committed KV."""
        n = min(seq.num_cached, len(seq.token_ids)) // self.block_size
        n = min(n, len(seq.block_ids))
        if n <= seq.num_registered:
            return
        keys = self._keys(seq, n)
        for i in range(seq.num_registered, n):
            b = seq.block_ids[i]
            if keys[i] not in self._block_of and b not in self._key_of:
                self._block_of[keys[i]] = b
                self._key_of[b] = keys[i]
                self.epoch += 1
        seq.num_registered = n

    def stats(self) -> dict:
        return {"prefix_cached_blocks": len(self._key_of), "prefix_evicted_blocks": self.num_evicted,
                "prefix_hit_tokens": self.num_hit_tokens,
                "prefix_query_tokens": self.num_queries,
                "prefix_hit_rate": self.num_hit_tokens / self.num_queries if self.num_queries else 0.0}

"""Paged KV cache: a block allocator (plain Python) and one tensor pool for all layers.

A sequence owns a list of block ids; token slot s of that sequence lives at flat slot
`block_ids[s // block_size] * block_size + s % block_size` in every layer's pool.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks; the scheduler preempts or queues instead."""


class BlockAllocator:
    """Free-list allocator over `num_blocks` block ids with owner counts.

    A block may have several owners (sequences sharing a cached prompt prefix, see
    `prefix_cache.py`); it leaves its last owner either to the free list or, when `retain(b)`
    says its KV is worth keeping, to an LRU of evictable blocks. `allocate` takes free blocks
    first, then evicts the least recently released ones (calling `on_evict(b)`). Evictable
    blocks count as free: they cost nothing to reclaim."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}                       # block -> owners (>= 1)
        self._evictable: OrderedDict[int, None] = OrderedDict()   # owned by none, KV kept
        self.retain = None                                    # fn(block) -> keep its KV at 0 owners
        self.on_evict = None                                  # fn(block): its KV is about to be reused

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                if self.on_evict is not None:
                    self.on_evict(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def share(self, b: int) -> None:
        """One more owner of block `b` (an owned block, or an evictable one taken back)."""
        if b in self._evictable:
            del self._evictable[b]
            self._refs[b] = 1
        elif b in self._refs:
            self._refs[b] += 1
        else:
            raise ValueError(f"KV block {b} is free; only owned or evictable blocks can be shared")

    def owners(self, b: int) -> int:
        return self._refs.get(b, 0)

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            n = self._refs.get(b, 0)
            if n == 0:
                raise ValueError(f"double free of KV block {b}")
            if n > 1:
                self._refs[b] = n - 1
                continue
            del self._refs[b]
            if self.retain is not None and self.retain(b):
                self._evictable[b] = None
            else:
                self._free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class KVCache:
    """K and V for every layer in one tensor: [num_layers, 2, num_slots, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.data = torch.zeros(num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx, 0], self.data[idx, 1]

    def slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Flat slots of sequence token positions [start, end)."""
        return self.slots_at(block_ids, range(start, end))

    def slots_at(self, block_ids: list[int], positions) -> list[int]:
        """Flat slots of the given sequence token positions."""
        bs = self.block_size
        return [block_ids[s // bs] * bs + s % bs for s in positions]

    def move(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy KV of src slots to dst slots in every layer (used to compact accepted paths)."""
        if not src_slots:
            return
        src = torch.tensor(src_slots, device=self.data.device)
        dst = torch.tensor(dst_slots, device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]

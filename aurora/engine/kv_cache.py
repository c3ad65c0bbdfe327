"""Paged KV cache: a block allocator (plain Python) and one tensor pool for all layers.

A sequence owns a list of block ids; token slot s of that sequence lives at flat slot
`block_ids[s // block_size] * block_size + s % block_size` in every layer's pool.
"""
from __future__ import annotations

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks; the scheduler preempts or queues instead."""


class BlockAllocator:
    """Free-list allocator over `num_blocks` block ids; never hands out a block twice."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if b not in self._used:
                raise ValueError(f"double free of KV block {b}")
            self._used.remove(b)
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

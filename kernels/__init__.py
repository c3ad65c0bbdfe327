"""Attention kernels, installed as `aurora.kernels`: one dispatch entry point per op.

`paged_tree_attention` serves the target (prefill, decode, tree verification);
`tree_attention` serves the trainer's packed trees. The pure-torch references in
`reference.py` are the specification. Triton runs on CUDA; the reference runs on
CPU. `AURORA_ATTENTION=reference|triton` forces either (tests use it; forced Triton on
CPU tensors needs TRITON_INTERPRET=1). `AURORA_TRAIN_ATTENTION=sdpa|flex` picks the
trainer's attention (default sdpa until `examples/bench_kernels.py` says otherwise).
"""
from __future__ import annotations

import os

import torch

from .reference import (group_args, paged_tree_attention_ref, plan_paged, plan_prompt, split_groups,
                        tree_attention_dense_ref)


def backend(device: torch.device) -> str:
    forced = os.environ.get("AURORA_ATTENTION", "").strip().lower()
    if forced in ("reference", "triton"):
        return forced
    if forced:
        raise ValueError(f"AURORA_ATTENTION must be 'reference' or 'triton', got {forced!r}")
    return "triton" if device.type == "cuda" and _triton_available() else "reference"


def _triton_available() -> bool:
    try:
        from . import tree_attention_triton  # noqa: F401
        return True
    except Exception:
        return False


def _load_triton():
    try:
        from .tree_attention_triton import paged_tree_attention_triton
    except ImportError as e:
        raise RuntimeError(f"AURORA_ATTENTION=triton but the Triton kernel cannot be imported: {e}; "
                           "install triton or use AURORA_ATTENTION=reference") from e
    return paged_tree_attention_triton


def train_backend(device: torch.device) -> str:
    forced = os.environ.get("AURORA_TRAIN_ATTENTION", "").strip().lower()
    if forced and forced not in ("sdpa", "flex"):
        raise ValueError(f"AURORA_TRAIN_ATTENTION must be 'sdpa' or 'flex', got {forced!r}")
    return forced or "sdpa"


def paged_tree_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, tree_mask,
                         positions, block_size, scale, sliding_window=None, softcap=None,
                         step_cache: dict | None = None, impl: str | None = None):
    """See `reference.paged_tree_attention_ref` for shapes and semantics. `step_cache`: a dict
    living for one model step (same metadata in every layer); the reference keeps its
    layer-independent index/mask plan there. `impl` skips the backend lookup."""
    if (impl or backend(q.device)) == "triton":
        paged_tree_attention_triton = _load_triton()
        return paged_tree_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start,
                                           tree_mask, positions, block_size, scale, sliding_window, softcap)
    plan = None
    if step_cache is not None:
        key = ("plan", sliding_window)
        plan = step_cache.get(key)
        if plan is None:
            plan = step_cache[key] = _plan(block_tables, seq_lens, query_start, tree_mask, positions,
                                           block_size, q.shape[0], sliding_window)
    return paged_tree_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, tree_mask,
                                    positions, block_size, scale, sliding_window, softcap, plan)


def tree_attention(q, k, v, mask, scale):
    """Masked attention over packed tree sequences for training; see `tree_attention_dense_ref`."""
    if train_backend(q.device) == "flex":
        from .train_attention import tree_attention_flex
        return tree_attention_flex(q, k, v, mask, scale)
    return tree_attention_dense_ref(q, k, v, mask, scale)


def _plan(block_tables, seq_lens, query_start, tree_mask, positions, block_size, num_tokens, sliding_window,
          split: bool = True):
    """A ragged step gets one plan per group (`split_groups`); a fresh causal prompt of one
    sequence the mask-free plan; everything else the general one. A group is not split again:
    the partition is already the cheapest among those contiguous in the grouping's order."""
    groups = split_groups(query_start, seq_lens) if split else None
    if groups is not None:
        parts = []
        for group in groups:
            rows, sub = group_args(group, block_tables, seq_lens, query_start, tree_mask, positions)
            num = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
            parts.append((rows, _plan(*sub, block_size, num, sliding_window, split=False)))
        return {"groups": parts}
    if (seq_lens.shape[0] == 1 and int(seq_lens[0]) == num_tokens and tree_mask.shape == (num_tokens, num_tokens)
            and (not sliding_window or num_tokens <= sliding_window) and num_tokens > 1
            and bool(torch.equal(tree_mask, torch.ones_like(tree_mask).tril_()))):
        return plan_prompt(block_tables, num_tokens, block_size)
    return plan_paged(block_tables, seq_lens, query_start, tree_mask, positions, block_size, num_tokens,
                      sliding_window)

"""FlexAttention path for the trainer's packed-tree attention (`tree_attention`).

Same contract as `reference.tree_attention_dense_ref` (the spec): the dense bool mask is
turned into a FlexAttention block mask, so fully masked 128x128 tiles (most of a packed
tree's ancestor mask) are skipped in forward and backward. Compiled on CUDA; eager
elsewhere, where torch 2.13 runs the forward only (no backward on CPU). Whether it beats
SDPA with a dense mask is measured by `examples/bench_kernels.py`, not assumed.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_compiled = None


def cuda_kernel_options() -> dict:
    """FlexAttention's main Triton kernel, never its decoding kernel. Flex picks the decoding
    kernel for short queries (a 64-node tree is one), which has no backward, and which torch
    2.11 failed to lower on an H200 for these shapes (`NoValidChoicesError`, examples/gpu_check.sh).
    Newer torch names the choice `BACKEND`; older torch has the legacy knob."""
    return {"BACKEND": "TRITON"} if _has_backend_option() else {"FORCE_USE_FLEX_ATTENTION": True}


@functools.cache
def _has_backend_option() -> bool:
    """Whether this torch's FlexAttention takes `kernel_options["BACKEND"]` (read once; a fresh
    dict per call, since flex may fill in defaults)."""
    from torch.nn.attention import flex_attention as fa
    return "BACKEND" in getattr(getattr(fa, "FlexKernelOptions", None), "__annotations__", {})


def _flex(device: torch.device):
    global _compiled
    if device.type != "cuda":
        return flex_attention  # eager: unfused, for checking semantics
    if _compiled is None:
        _compiled = torch.compile(flex_attention)  # automatic dynamic shapes after the first recompile
    return _compiled


def tree_block_mask(
    mask: torch.Tensor,   # [B, T, S] bool (True = visible)
):
    """FlexAttention `BlockMask` that reads the dense mask; shared by every head."""
    batch, num_q, num_kv = mask.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, num_q, num_kv, device=mask.device)


def tree_attention_flex(
    q: torch.Tensor,      # [B, H, T, D]
    k: torch.Tensor,      # [B, Hkv, S, D]
    v: torch.Tensor,      # [B, Hkv, S, D]
    mask: torch.Tensor,   # [B, T, S] bool (True = visible); every row has a visible key
    scale: float,
    block_mask=None,      # optional prebuilt `tree_block_mask(mask)` (reuse across layers)
) -> torch.Tensor:        # [B, H, T, D]
    if block_mask is None:
        block_mask = tree_block_mask(mask)
    options = cuda_kernel_options() if q.device.type == "cuda" else None
    return _flex(q.device)(q, k, v, block_mask=block_mask, scale=scale,
                           enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)

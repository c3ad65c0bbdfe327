"""Triton tree attention over a paged KV cache: the fast path of `paged_tree_attention`.

Same signature and semantics as `reference.paged_tree_attention_ref` (the spec). One
program owns BLOCK_Q query tokens of one sequence times the GROUP query heads that share
one KV head (GQA), walks that sequence's block table in tiles of BLOCK_N keys and keeps a
flash-attention online softmax in fp32. Cached keys are visible subject to the sliding
window; the sequence's new keys (its last `n_new`) additionally pass through `tree_mask`.
Runs on CUDA, and on CPU under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_tree_attn_kernel(
    Q,            # [num_tokens, num_heads, head_dim]
    K,            # [num_slots, num_kv_heads, head_dim]
    V,            # [num_slots, num_kv_heads, head_dim]
    Out,          # [num_tokens, num_heads, head_dim]
    BlockTables,  # [num_seqs, max_blocks] int
    SeqLens,      # [num_seqs] int, cached + new keys
    QueryStart,   # [num_seqs + 1] int
    TreeMask,     # [num_tokens, max_new] uint8 (bool viewed as bytes)
    Positions,    # [num_tokens] int
    num_seqs, scale, softcap, window,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_tm,
    PAGE: tl.constexpr,          # KV block size in slots
    GROUP: tl.constexpr,         # query heads per KV head
    GROUP_PAD: tl.constexpr,     # next power of two of GROUP
    BLOCK_Q: tl.constexpr,       # query tokens per program
    BLOCK_M: tl.constexpr,       # rows per program: >= BLOCK_Q * GROUP_PAD, >= 16
    BLOCK_N: tl.constexpr,       # keys per tile
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,      # dots in fp32 ("ieee", not tf32): fp32 inputs, and the interpreter,
                                 # whose bf16 dot multiplies the raw uint16 bits (Triton 3.9)
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Program -> sequence: query block b of sequence i has id query_start[i] // BLOCK_Q + i + b,
    # a monotone numbering with room for every sequence's cdiv(n_new, BLOCK_Q) blocks, so the
    # grid needs no host sync. Binary search for the last i with first_id(i) <= pid.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(QueryStart + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_lo = tl.load(QueryStart + seq).to(tl.int32)
    q_hi = tl.load(QueryStart + seq + 1).to(tl.int32)
    q0 = q_lo + (pid - (q_lo // BLOCK_Q + seq)) * BLOCK_Q
    if q0 >= q_hi:  # spare program
        return
    seq_len = tl.load(SeqLens + seq).to(tl.int32)
    num_cached = seq_len - (q_hi - q_lo)

    # Rows are (query token, head within the KV group) pairs.
    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // GROUP_PAD                                      # [BLOCK_M]
    head = kv_head * GROUP + rows % GROUP_PAD                         # [BLOCK_M]
    row_ok = (rows // GROUP_PAD < BLOCK_Q) & (tok < q_hi) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)   # [BLOCK_M, HEAD_DIM_PAD]
    q_pos = tl.load(Positions + tok, mask=row_ok, other=0)           # [BLOCK_M]

    # Cached key j sits at position j, so a window skips every tile before the oldest visible key.
    kv_start = 0
    if USE_WINDOW:
        min_pos = tl.min(tl.where(row_ok, q_pos, 2147483647), axis=0)
        kv_start = tl.maximum(min_pos - window + 1, 0)
        kv_start = (tl.minimum(kv_start, num_cached) // BLOCK_N * BLOCK_N).to(tl.int32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(kv_start, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)                          # [BLOCK_N] key index in the sequence
        key_ok = keys < seq_len
        page = tl.load(BlockTables + seq * stride_bt + keys // PAGE, mask=key_ok, other=0)
        slot = page.to(tl.int64) * PAGE + keys % PAGE                 # [BLOCK_N]
        k = tl.load(K + slot[None, :] * stride_ks + kv_head * stride_kh + dims[:, None],
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [HEAD_DIM_PAD, BLOCK_N]
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)                                          # [BLOCK_M, BLOCK_N] fp32
        s = s * scale
        if USE_SOFTCAP:  # softcap * tanh(s / softcap); tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) <= 1
            e = tl.exp(-2.0 * tl.abs(s) / softcap)
            th = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(s < 0, -th, th)

        # Visibility: cached keys always, new key j - num_cached per the query's tree-mask row.
        new_idx = keys - num_cached
        is_new = new_idx >= 0
        visible = row_ok[:, None] & key_ok[None, :]
        tree = tl.load(TreeMask + tok[:, None] * stride_tm + new_idx[None, :],
                       mask=visible & is_new[None, :], other=0)
        visible = visible & ((tree != 0) | (~is_new[None, :]))
        if USE_WINDOW:
            new_pos = tl.load(Positions + q_lo + new_idx, mask=key_ok & is_new, other=0)
            k_pos = tl.where(is_new, new_pos, keys)
            visible = visible & ((q_pos[:, None] - k_pos[None, :]) < window)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))  # log2 domain

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])                               # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _interpreted(fn) -> bool:
    return not isinstance(fn, triton.runtime.JITFunction)


def _check_mode(device: torch.device) -> bool:
    """True when running under the Triton interpreter. Triton fixes the mode when it is first
    imported (its own `tl.zeros`, `tl.max`, ... are jitted then), so TRITON_INTERPRET=1 must be
    set before the first `import triton` in the process; it cannot be switched per call."""
    interpreted = _interpreted(tl.zeros)
    if interpreted != _interpreted(_paged_tree_attn_kernel):
        raise RuntimeError("TRITON_INTERPRET changed between importing triton and importing "
                           "aurora.kernels.tree_attention_triton; set it before the first `import triton`")
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(f"paged_tree_attention_triton needs CUDA tensors (got {device.type}); to run "
                           "it on CPU set TRITON_INTERPRET=1 before triton is first imported")
    return interpreted


def paged_tree_attention_triton(
    q: torch.Tensor,             # [num_tokens, num_heads, head_dim] new tokens, packed by sequence
    k_cache: torch.Tensor,       # [num_slots, num_kv_heads, head_dim] (flat pool, new K already written)
    v_cache: torch.Tensor,       # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int, block ids of each sequence
    seq_lens: torch.Tensor,      # [num_seqs] int, cached + new keys of each sequence
    query_start: torch.Tensor,   # [num_seqs + 1] int, offsets of each sequence's queries in q
    tree_mask: torch.Tensor,     # [num_tokens, max_new] bool, query i may see new key j of its sequence
    positions: torch.Tensor,     # [num_tokens] int, position ids of the new tokens
    block_size: int,
    scale: float,
    sliding_window: int | None = None,  # key visible iff q_pos - k_pos < window
    softcap: float | None = None,       # scores = softcap * tanh(scores / softcap)
) -> torch.Tensor:               # [num_tokens, num_heads, head_dim]
    """See `reference.paged_tree_attention_ref`. No host synchronisation."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert k_cache.shape[2] == head_dim and v_cache.shape == k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the KV pool must share a dtype"
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    interpreted = _check_mode(q.device)
    if q.stride(2) != 1:
        q = q.contiguous()
    if tree_mask.dtype == torch.bool:
        tree_mask = tree_mask.view(torch.uint8)
    if tree_mask.shape[1] > 0 and tree_mask.stride(1) != 1:
        tree_mask = tree_mask.contiguous()

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    max_new = max(tree_mask.shape[1], 1)  # static bound: no sync for n_new.max()
    block_q = max(1, min(triton.next_power_of_2(max_new), 64 // group_pad))
    block_m = max(16, block_q * group_pad)
    block_n = 64
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = softcap is not None and softcap > 0
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_tree_attn_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start, tree_mask, positions,
        num_seqs, float(scale), float(softcap) if use_softcap else 1.0,
        int(sliding_window) if use_window else 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), tree_mask.stride(0),
        PAGE=block_size, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, FP32_DOT=q.dtype == torch.float32 or interpreted,
        num_warps=4,
    )
    return out

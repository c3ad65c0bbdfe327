"""Paged tree attention with static structure, for compiled target steps (torch.compile, CUDA graphs).

Same semantics as `reference.paged_tree_attention_ref` (the specification), split so that a
traced graph sees no data-dependent Python: `plan_static` (eager, once per step) turns the step
metadata into index and mask tensors whose *shapes* are all that varies between steps;
`paged_attention_static` (traced) gathers the cached K/V, appends the step's new K/V (not yet in
the pool: the runner writes them after the forward) and runs masked attention. For any step,
    paged_attention_static(q, k_new, v_new, pool before the step, plan)
 == paged_tree_attention_ref(q, pool with k_new/v_new written at slot_mapping, ...).
"""
from __future__ import annotations

import torch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_static(
    block_tables: torch.Tensor,  # [B, max_blocks] int, block ids of each sequence
    seq_lens: torch.Tensor,      # [B] int, cached + new keys of each sequence
    query_start: torch.Tensor,   # [B + 1] int, offsets of each sequence's queries
    tree_mask: torch.Tensor,     # [T, max_new] bool, query i may see new key j of its sequence
    positions: torch.Tensor,     # [T] int, position ids of the new tokens
    block_size: int,
    windows: tuple = (None,),    # the distinct sliding windows of the model's layers (None = full)
    kv_multiple: int = 16,       # cached keys padded to a multiple of this (never 0 or 1: no specialisation)
    q_multiple: int = 1,         # queries per sequence padded to a multiple of this (1 = exact)
) -> dict:
    """Index and mask tensors of one step (layer-independent). Shapes: B sequences, Q padded
    queries per sequence, C padded cached keys per sequence; T new tokens in all."""
    device = seq_lens.device
    num_tokens = positions.shape[0]
    num_seqs = seq_lens.shape[0]
    n_new = (query_start[1:] - query_start[:-1]).long()                    # [B]
    num_cached = seq_lens.long() - n_new                                    # [B]
    max_new = tree_mask.shape[1]
    q_len = _round_up(max_new, q_multiple)
    c_len = max(_round_up(int(num_cached.max()), kv_multiple), kv_multiple)

    # Cached keys through the block table: [B, C] flat slots (padding clamps to a real block: masked).
    key_pos = torch.arange(c_len, device=device)
    blk = (key_pos // block_size).clamp(max=block_tables.shape[1] - 1)
    kv_slots = block_tables.long()[:, blk] * block_size + key_pos % block_size

    # Queries per sequence [B, Q] and the way back to packed tokens [T].
    rows = torch.arange(q_len, device=device)
    q_valid = rows[None, :] < n_new[:, None]                                # [B, Q]
    q_index = (query_start[:-1, None].long() + rows[None, :]).clamp(max=num_tokens - 1)
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device), n_new, output_size=num_tokens)
    out_index = seq_of * q_len + torch.arange(num_tokens, device=device) - query_start.long()[seq_of]

    # Visibility: cached keys (causal, they precede every new token); new keys per tree_mask.
    sees_cached = key_pos[None, None, :] < num_cached[:, None, None]        # [B, 1, C]
    tm = torch.zeros(num_tokens, q_len, dtype=torch.bool, device=device)
    tm[:, :max_new] = tree_mask
    sees_new = tm[q_index] & q_valid[:, None, :]                            # [B, Q, Q]
    q_pos = positions[q_index]                                              # [B, Q]
    masks = {}
    for window in windows:
        cached = sees_cached.expand(num_seqs, q_len, c_len)
        new = sees_new
        if window is not None and window > 0:
            cached = cached & ((q_pos[:, :, None] - key_pos[None, None, :]) < window)
            new = new & ((q_pos[:, :, None] - q_pos[:, None, :]) < window)
        cached = cached & q_valid[:, :, None]
        cached[:, :, 0] |= ~q_valid                                         # padded rows: one finite key
        masks[window] = (cached.contiguous(), new & q_valid[:, :, None])
    return {"kv_slots": kv_slots, "q_index": q_index, "out_index": out_index, "masks": masks}


def paged_attention_static(
    q: torch.Tensor,         # [T, H, D] new tokens' queries, packed by sequence
    k_new: torch.Tensor,     # [T, Hkv, D] new tokens' keys (not yet in the pool)
    v_new: torch.Tensor,     # [T, Hkv, D]
    k_pool: torch.Tensor,    # [num_slots, Hkv, D] this layer's pool (cached keys)
    v_pool: torch.Tensor,    # [num_slots, Hkv, D]
    plan: dict,              # from plan_static
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:           # [T, H, D]
    num_heads, num_kv_heads = q.shape[1], k_new.shape[1]
    q_index, kv_slots = plan["q_index"], plan["kv_slots"]
    mask_cached, mask_new = plan["masks"][window]
    k = torch.cat([k_pool[kv_slots], k_new[q_index]], dim=1)              # [B, C + Q, Hkv, D]
    v = torch.cat([v_pool[kv_slots], v_new[q_index]], dim=1)
    mask = torch.cat([mask_cached, mask_new], dim=-1)[:, None]             # [B, 1, Q, C + Q]
    qh = q[q_index].transpose(1, 2)                                        # [B, H, Q, D]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                          # [B, Hkv, C + Q, D]
    group = num_heads // num_kv_heads
    if softcap is None or softcap <= 0:
        # fp32 compute: torch's CPU flash kernel is ~5x slower in bf16 than in fp32 at decode shapes;
        # grouped K/V are read in place (enable_gqa), not repeated per query head: compiled, batch 8,
        # 300 cached keys, 0.24 vs 1.07 ms per layer on this CPU
        out = torch.nn.functional.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(),
                                                               attn_mask=mask, scale=scale,
                                                               enable_gqa=group > 1).to(q.dtype)
    else:
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ vh.float()).to(q.dtype)
    out = out.transpose(1, 2)                                              # [B, Q, H, D]
    return out.reshape(-1, num_heads, out.shape[-1])[plan["out_index"]]

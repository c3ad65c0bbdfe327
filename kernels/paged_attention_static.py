"""Paged tree attention with static structure, for compiled target steps (torch.compile, CUDA graphs).

Same semantics as `reference.paged_tree_attention_ref` (the specification), split so that a
traced graph sees no data-dependent Python: `plan_static` (eager, once per step) turns the step
metadata into index and mask tensors whose *shapes* are all that varies between steps;
`paged_attention_static` (traced) gathers the cached K/V, appends the step's new K/V (not yet in
the pool: the runner writes them after the forward) and runs masked attention. For any step,
    paged_attention_static(q, k_new, v_new, pool before the step, plan)
 == paged_tree_attention_ref(q, pool with k_new/v_new written at slot_mapping, ...).
On CPU (no softcap) the attention is one opaque library op, `aurora::paged_attention_cpu`: inside
a compiled graph inductor would otherwise fuse the gather with the layer's pointwise ops into
loops that read the pool one scalar at a time.
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
    masks = {}                                                              # window -> [B, 1, Q, C + Q]
    for window in windows:
        cached = sees_cached.expand(num_seqs, q_len, c_len)
        new = sees_new
        if window is not None and window > 0:
            cached = cached & ((q_pos[:, :, None] - key_pos[None, None, :]) < window)
            new = new & ((q_pos[:, :, None] - q_pos[:, None, :]) < window)
        cached = cached & q_valid[:, :, None]
        cached[:, :, 0] |= ~q_valid                                         # padded rows: one finite key
        masks[window] = torch.cat([cached, new & q_valid[:, :, None]], dim=-1)[:, None]
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
    mask = plan["masks"][window]                                           # [B, 1, Q, C + Q]
    if (softcap is None or softcap <= 0) and q.device.type == "cpu":
        # one opaque op inside the compiled graph: inductor fused the gather with the layer's
        # pointwise ops into loops that read the pool one scalar at a time (batch 8, 300 cached
        # keys: ~0.9 ms per layer in those kernels, against ~0.1 ms for index_select + cat here)
        return torch.ops.aurora.paged_attention_cpu(q, k_new, v_new, k_pool, v_pool, plan["kv_slots"],
                                                    plan["q_index"], plan["out_index"], mask, scale)
    return _attend(q, k_new, v_new, k_pool, v_pool, plan["kv_slots"], plan["q_index"], plan["out_index"],
                   mask, scale, softcap)


def _attend(q, k_new, v_new, k_pool, v_pool, kv_slots, q_index, out_index, mask, scale, softcap=None):
    """Gather each sequence's cached K/V ([B, C] slots), append its new K/V ([B, Q] rows), attend in
    fp32 under `mask`, and scatter back to packed tokens. Shapes as in `paged_attention_static`."""
    num_seqs, q_len = q_index.shape
    num_heads, num_kv_heads, dim = q.shape[1], k_new.shape[1], q.shape[2]
    rows = q_index.reshape(-1)

    def gathered(pool, new):                                               # [B, C + Q, Hkv, D], fp32
        cached = pool.index_select(0, kv_slots.reshape(-1)).view(num_seqs, -1, num_kv_heads, dim)
        out = cached.new_empty(num_seqs, cached.shape[1] + q_len, num_kv_heads, dim, dtype=torch.float32)
        out[:, :cached.shape[1]] = cached                                  # cast while copying: one pass
        out[:, cached.shape[1]:] = new.index_select(0, rows).view(num_seqs, q_len, num_kv_heads, dim)
        return out

    k, v = gathered(k_pool, k_new), gathered(v_pool, v_new)
    qh = q.index_select(0, rows).view(num_seqs, q_len, num_heads, dim).transpose(1, 2).float()  # [B, H, Q, D]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                          # [B, Hkv, C + Q, D]
    group = num_heads // num_kv_heads
    if softcap is None or softcap <= 0:
        # fp32 compute: torch's CPU flash kernel is ~5x slower in bf16 than in fp32 at decode shapes;
        # grouped K/V are read in place (enable_gqa), not repeated per query head
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                                               enable_gqa=group > 1)
    else:
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1) @ vh
    out = out.to(q.dtype).transpose(1, 2)                                  # [B, Q, H, D]
    return out.reshape(-1, num_heads, dim).index_select(0, out_index)


# The opaque op: a plain library op (dispatcher cost ~2 us per call; torch.library.custom_op's
# wrapper costs ~75 us, i.e. 2 ms per step of a 30-layer model).
_OP = "paged_attention_cpu"
_SCHEMA = (f"{_OP}(Tensor q, Tensor k_new, Tensor v_new, Tensor k_pool, Tensor v_pool, Tensor kv_slots, "
           "Tensor q_index, Tensor out_index, Tensor mask, float scale) -> Tensor")
_LIB = torch.library.Library("aurora", "FRAGMENT")
if not hasattr(torch.ops.aurora, _OP):            # one definition per process (module reloads in tests)
    _LIB.define(_SCHEMA)
    _LIB.impl(_OP, _attend, "CPU")

    @torch.library.register_fake(f"aurora::{_OP}", lib=_LIB)
    def _(q, k_new, v_new, k_pool, v_pool, kv_slots, q_index, out_index, mask, scale):
        return q.new_empty(q.shape)                                        # [T, H, D]

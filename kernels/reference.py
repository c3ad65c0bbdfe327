"""Pure-torch tree attention over a paged KV cache: the specification of the kernels.

Every query is a new token of some sequence (a prompt chunk, a decode token, or a
draft-tree node). It sees all of its sequence's cached keys (subject to the sliding
window) and, among the sequence's new keys, exactly those `tree_mask` allows.
On CPU, bf16/fp16 decode/verify scores are computed in fp32 after the gather (measured
~3-4x faster than half-precision SDPA at those shapes; prompts stay in their dtype); one sequence whose blocks are contiguous is
read through a view instead of a gathered copy; a fresh causal prompt skips the mask.
A ragged step (prompt chunks or deep draft trees next to decoding sequences) attends in groups
(`split_groups`): padding every sequence's queries to the longest run would cost B x max_new
query rows; the groups minimise a measured cost of calls and padded work.
Grouped-query attention at decode/verify shapes folds each kv head's query heads into rows of
one head (SDPA with `enable_gqa` over 1-row queries measured 330 us per layer at batch 8,
the folded call 130 us).
"""
from __future__ import annotations

import torch


def plan_paged(block_tables, seq_lens, query_start, tree_mask, positions, block_size: int,
               num_tokens: int, sliding_window: int | None = None) -> dict:
    """Index and mask tensors of one step; independent of the layer, so a runner may build
    them once per step and reuse them in every layer (pass as `plan=`)."""
    device = seq_lens.device
    num_seqs = seq_lens.shape[0]
    n_new = query_start[1:] - query_start[:-1]                       # [B]
    max_new = int(n_new.max())
    max_len = int(seq_lens.max())
    num_blk = (max_len + block_size - 1) // block_size

    # Every sequence's keys through its block table: slots [B, max_len].
    offs = torch.arange(block_size, device=device)
    slots = (block_tables[:, :num_blk, None].long() * block_size + offs).reshape(num_seqs, -1)[:, :max_len]

    # Pad queries per sequence: [B, max_new].
    rows = torch.arange(max_new, device=device)
    q_valid = rows[None, :] < n_new[:, None]
    q_idx = (query_start[:-1, None] + rows[None, :]).clamp(max=num_tokens - 1)

    # Visibility: cached keys always (causal: they precede every new token), new keys per tree_mask.
    key_slot = torch.arange(max_len, device=device)
    num_cached = (seq_lens - n_new)[:, None]                          # [B, 1]
    is_cached = key_slot[None, :] < num_cached                        # [B, max_len]
    new_idx = key_slot[None, :] - num_cached                          # [B, max_len]
    is_new = (new_idx >= 0) & (new_idx < n_new[:, None]) & (key_slot[None, :] < seq_lens[:, None])
    tm = tree_mask[q_idx]                                             # [B, max_new, max_new]
    gather_idx = new_idx.clamp(0, max(max_new - 1, 0))[:, None, :].expand(-1, max_new, -1)
    sees_new = torch.gather(tm, 2, gather_idx) & is_new[:, None, :]
    mask = is_cached[:, None, :] | sees_new                           # [B, max_new, max_len]
    if sliding_window is not None and sliding_window > 0:
        new_pos = positions[(query_start[:-1, None] + new_idx.clamp(min=0)).clamp(max=num_tokens - 1)]
        k_pos = torch.where(is_cached, key_slot[None, :], new_pos)    # [B, max_len]
        q_pos = positions[q_idx]                                      # [B, max_new]
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    mask &= q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid                                         # padded rows: avoid all -inf
    full = bool(mask.all())                                           # e.g. one sequence decoding
    return {"slots": slots, "flat_slots": slots.reshape(-1), "q_idx": q_idx, "q_valid": q_valid,
            "mask": None if full else mask, "all_valid": bool(q_valid.all()),
            "contiguous": _contiguous_start(slots), "causal": False}


def _contiguous_start(slots: torch.Tensor) -> int | None:
    """First slot when one sequence's keys occupy consecutive slots (read as a view), else None."""
    if slots.shape[0] != 1 or slots.shape[1] == 0:
        return None
    first = int(slots[0, 0])
    return first if int(slots[0, -1]) - first == slots.shape[1] - 1 and bool(
        (slots[0, 1:] - slots[0, :-1] == 1).all()) else None


def plan_prompt(block_tables, seq_len: int, block_size: int) -> dict:
    """Plan of a lone sequence whose new tokens are its whole (causal) prompt: no mask tensor,
    SDPA's own causal masking (the common long-prefill case; `plan_paged` would build [T, T])."""
    num_blk = (seq_len + block_size - 1) // block_size
    offs = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:1, :num_blk, None].long() * block_size + offs).reshape(1, -1)[:, :seq_len]
    rows = torch.arange(seq_len, device=block_tables.device)
    return {"slots": slots, "flat_slots": slots.reshape(-1), "q_idx": rows[None],
            "q_valid": torch.ones(1, seq_len, dtype=torch.bool, device=block_tables.device),
            "mask": None, "all_valid": True, "contiguous": _contiguous_start(slots), "causal": True}


# Cost of one group's attention per layer on CPU, in query-key pairs (fitted on a 2-core AMD EPYC,
# bf16 pool, fp32 compute, SmolLM2's 9 / 3 heads of 64: 49 us per call + 41 ns per gathered key
# + 19 ns per scored query-key pair, 8 us per sequence either way). A group pads every member to
# its longest new-token run and its longest context: |g| x max_len x (KEY_COST + max_new).
PROMPT_ROWS = 32     # a sequence with more new tokens than this (a prompt chunk) attends alone
GROUP_CALL = 2600    # a separate attention call costs about this many padded query-key pairs
KEY_COST = 2         # gathering (and upcasting) one key costs about this many scored pairs


def split_groups(query_start: torch.Tensor, seq_lens: torch.Tensor | None = None) -> list[list[int]] | None:
    """Sequence groups of a ragged step, or None when one padded call is cheapest. One call pads
    every sequence to the longest new-token run (a prompt chunk, a deep draft tree) and the
    longest context: 15 decoding sequences beside one 24-token prompt computed 16 x 24 query
    rows per layer (+75 ms per step measured, against +26 ms with the prompt alone). A sequence
    with more than PROMPT_ROWS new tokens (a prompt chunk) attends alone, through the mask-free
    causal plan when it is a fresh prompt (padding similar prompts into one masked call measured
    slower). The rest are grouped to minimise sum over groups of
        GROUP_CALL + |g| * max_len(g) * (KEY_COST + max_new(g)),
    by an exact dynamic programme over them sorted by (new tokens, context length), optimal among
    the partitions contiguous in that order; a long context beside short ones is split off too."""
    n_new = (query_start[1:] - query_start[:-1]).tolist()
    if len(n_new) < 2:
        return None
    lens = seq_lens.tolist() if seq_lens is not None else list(n_new)
    groups = [[i] for i, n in enumerate(n_new) if n > PROMPT_ROWS]
    order = sorted((i for i, n in enumerate(n_new) if n <= PROMPT_ROWS), key=lambda i: (n_new[i], lens[i]))
    best = [0.0] + [float("inf")] * len(order)          # best[j]: cheapest split of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        top_new, top_len = n_new[order[j - 1]], 0          # the segment order[i:j]: max_new is its last
        for i in range(j - 1, -1, -1):
            top_len = max(top_len, lens[order[i]])
            c = best[i] + GROUP_CALL + (j - i) * top_len * (KEY_COST + top_new)
            if c < best[j]:
                best[j], cut[j] = c, i
    j = len(order)
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return sorted(groups) if len(groups) > 1 else None


def group_args(group: list[int], block_tables, seq_lens, query_start, tree_mask, positions):
    """(token rows of `group`'s new tokens: a slice when contiguous, else an index tensor; and
    its own (block_tables, seq_lens, query_start, tree_mask, positions))."""
    starts = query_start.tolist()
    if len(group) == 1:
        rows = slice(starts[group[0]], starts[group[0] + 1])
    else:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=query_start.device) for i in group])
    sel = torch.tensor(group, device=query_start.device)
    n_new = query_start[1:][sel] - query_start[:-1][sel]
    qs = torch.zeros(len(group) + 1, dtype=query_start.dtype, device=query_start.device)
    qs[1:] = n_new.cumsum(0)
    return rows, (block_tables[sel], seq_lens[sel], qs, tree_mask[rows][:, :int(n_new.max())], positions[rows])


PREFILL_ROWS = 256   # from this many queries per sequence, CPU half SDPA is as fast as fp32


def compute_dtype(dtype: torch.dtype, device: torch.device, rows: int = 1) -> torch.dtype:
    """The dtype attention runs in: fp32 on CPU for half types at decode/verify shapes (CPU half
    SDPA is several times slower there); the native dtype for long prompt chunks (on par, and
    no upcast copies)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and rows < PREFILL_ROWS:
        return torch.float32
    return dtype


def _gather(cache: torch.Tensor, plan: dict, dtype: torch.dtype) -> torch.Tensor:
    """[num_slots, Hkv, D] pool -> [B, max_len, Hkv, D] keys of each sequence in `dtype`."""
    slots = plan["slots"]
    start = plan["contiguous"]
    if start is not None:
        out = cache[start:start + slots.shape[1]][None]
    else:
        flat = cache.view(cache.shape[0], -1).index_select(0, plan["flat_slots"])
        out = flat.view(slots.shape[0], slots.shape[1], *cache.shape[1:])
    return out.to(dtype)


def paged_tree_attention_ref(
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
    plan: dict | None = None,           # from plan_paged (same metadata and window); built if None
) -> torch.Tensor:               # [num_tokens, num_heads, head_dim]
    num_tokens = q.shape[0]
    if plan is None:
        plan = plan_paged(block_tables, seq_lens, query_start, tree_mask, positions, block_size,
                          num_tokens, sliding_window)
    if "groups" in plan:                                              # a ragged step, group by group
        out = torch.empty_like(q)
        for rows, sub in plan["groups"]:
            out[rows] = _attend(q[rows], k_cache, v_cache, sub, scale, softcap)
        return out
    return _attend(q, k_cache, v_cache, plan, scale, softcap)


def _attend(q, k_cache, v_cache, plan: dict, scale: float, softcap: float | None) -> torch.Tensor:
    """`paged_tree_attention_ref` of one plan (not grouped): [num_tokens, H, D]."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    dtype = compute_dtype(q.dtype, q.device, plan["q_idx"].shape[1])
    k = _gather(k_cache, plan, dtype)                                 # [B, max_len, Hkv, D]
    v = _gather(v_cache, plan, dtype)
    # all_valid: every sequence has max_new new tokens, packed in order, so [B, max_new] is a reshape
    qp = (q.reshape(*plan["q_idx"].shape, *q.shape[1:]) if plan["all_valid"] else q[plan["q_idx"]]).to(dtype)
    mask = plan["mask"]                                               # qp: [B, max_new, H, D]

    group = num_heads // num_kv_heads
    qh = qp.permute(0, 2, 1, 3)                                       # [B, H, max_new, D]
    kh = k.permute(0, 2, 1, 3)                                        # [B, Hkv, max_len, D]
    vh = v.permute(0, 2, 1, 3)
    if (softcap is None or softcap <= 0) and group > 1 and not plan["causal"] and qh.shape[2] < PREFILL_ROWS:
        # GQA folded: the `group` query heads of kv head j (heads j*group ... j*group+group-1)
        # attend as group * max_new query rows of head j, row g*max_new + i under query i's mask
        # (not for long prompt chunks: 512 bf16 rows over 2,512 keys took 13.8 ms folded, 10.2 not)
        b, _, rows, dim = qh.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            qh.reshape(b, num_kv_heads, group * rows, dim), kh, vh, attn_mask=_folded_mask(plan, group),
            scale=scale).view(b, num_heads, rows, dim)
    elif softcap is None or softcap <= 0:
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=None if mask is None else mask[:, None], scale=scale,
            is_causal=plan["causal"], enable_gqa=group > 1)
    else:
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if plan["causal"]:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()[None]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = scores.softmax(-1) @ vh.float()
    out = out.permute(0, 2, 1, 3).to(q.dtype)                         # [B, max_new, H, D]
    if plan["all_valid"]:
        return out.reshape(q.shape)                                   # [num_tokens, H, D]
    return out[plan["q_valid"]]


def _folded_mask(plan: dict, group: int) -> torch.Tensor | None:
    """The plan's mask [B, max_new, max_len] repeated for `group` folded heads: [B, 1, group *
    max_new, max_len] (built once per step, every layer reuses it)."""
    mask = plan["mask"]
    if mask is None:
        return None
    key = ("folded_mask", group)
    if key not in plan:
        b, rows, keys = mask.shape
        plan[key] = mask[:, None, None].expand(b, 1, group, rows, keys).reshape(b, 1, group * rows, keys)
    return plan[key]


def tree_attention_dense_ref(
    q: torch.Tensor,      # [B, H, T, D]
    k: torch.Tensor,      # [B, Hkv, S, D]
    v: torch.Tensor,      # [B, Hkv, S, D]
    mask: torch.Tensor,   # [B, T, S] bool (True = visible); every row has a visible key
    scale: float,
) -> torch.Tensor:        # [B, H, T, D]
    """Dense masked attention for training over packed tree sequences (differentiable)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)

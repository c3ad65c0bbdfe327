"""How a ragged step's sequences are grouped for CPU attention: the cost-based grouping of
`kernels/reference.py` (`split_groups`) against the rule it replaced (session 15: only prompt
chunks over 32 tokens apart, everything else in one padded call), attention alone over 30 layers
of SmolLM2-135M's shapes (9 query / 3 kv heads of 64, bf16 pool, fp32 compute), best of 2 x 9.

    python examples/attention_groups.py
"""
from __future__ import annotations

import random
import time

import aurora.kernels as K
import torch
from aurora.kernels.reference import split_groups

LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 30, 9, 3, 64, 16


def threshold_rule(query_start, seq_lens=None):
    """The replaced rule: sequences with more than 32 new tokens alone, the rest in one call."""
    n = (query_start[1:] - query_start[:-1]).tolist()
    if len(n) < 2 or max(n) <= 32:
        return None
    short = [i for i, x in enumerate(n) if x <= 32]
    return [[i] for i, x in enumerate(n) if x > 32] + ([short] if short else [])


def step_args(specs, seed=0):
    """specs: [(cached tokens, new tokens, kind)], kind 'prompt' (causal), 'tree' (a random tree)
    or 'decode'. The dispatcher's arguments for one step, blocks scattered over the pool."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lens = [c + n for c, n, _ in specs]
    nblk = [-(-s // BLOCK) for s in lens]
    order = torch.randperm(sum(nblk) + 1, generator=gen).tolist()
    table = torch.zeros(len(specs), max(nblk), dtype=torch.int32)
    taken, positions, masks = 0, [], []
    for i, ((cached, n, kind), b) in enumerate(zip(specs, nblk)):
        table[i, :b] = torch.tensor(order[taken:taken + b])
        taken += b
        m = torch.eye(n, dtype=torch.bool)
        if kind == "prompt":
            m = torch.ones(n, n, dtype=torch.bool).tril()
        elif kind == "tree":                              # each node sees its ancestors and itself
            for j in range(1, n):
                m[j] |= m[rng.randrange(j)]
        masks.append(m)
        positions += range(cached, cached + n)
    width = max(n for _, n, _ in specs)
    tree_mask = torch.zeros(sum(n for _, n, _ in specs), width, dtype=torch.bool)
    row = 0
    for m in masks:
        tree_mask[row:row + m.shape[0], :m.shape[1]] = m
        row += m.shape[0]
    pool = len(order) * BLOCK
    n_new = [n for _, n, _ in specs]
    return dict(q=torch.randn(row, HEADS, DIM, generator=gen).bfloat16(),
                k_cache=torch.randn(pool, KV_HEADS, DIM, generator=gen).bfloat16(),
                v_cache=torch.randn(pool, KV_HEADS, DIM, generator=gen).bfloat16(),
                block_tables=table, seq_lens=torch.tensor(lens, dtype=torch.int32),
                query_start=torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32),
                tree_mask=tree_mask, positions=torch.tensor(positions), block_size=BLOCK, scale=DIM ** -0.5)


def step_ms(args, rule, reps=9) -> float:
    """Best of `reps` (ms): one step's plan, then attention in every layer (as the runner calls it)."""
    K.split_groups = rule
    best = float("inf")
    for _ in range(reps):
        cache: dict = {}
        t = time.perf_counter()
        for _ in range(LAYERS):
            K.paged_tree_attention(**args, step_cache=cache, impl="reference")
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dec = lambda b: [(150 + 9 * i, 1, "decode") for i in range(b)]      # noqa: E731
    cases = {
        "16 decoding": dec(16),
        "15 decoding + a 12-token prompt": dec(15) + [(0, 12, "prompt")],
        "15 decoding + a 24-token prompt": dec(15) + [(0, 24, "prompt")],
        "13 decoding + 3 trees of 8": dec(13) + [(200, 8, "tree")] * 3,
        "12 decoding + 4 trees of 16": dec(12) + [(200, 16, "tree")] * 4,
        "8 trees of 2 + 8 trees of 6": [(150 + 9 * i, 2, "tree") for i in range(8)] + [(180, 6, "tree")] * 8,
        "15 decoding + one at 3,000 tokens": dec(15) + [(3000, 1, "decode")],
    }
    print("| step | one padded call / threshold rule, ms | cost-based groups, ms | groups |\n|---|---|---|---|")
    new = split_groups
    try:
        for name, specs in cases.items():
            args = step_args(specs)
            step_ms(args, threshold_rule, 2), step_ms(args, new, 2)            # warm-up
            old_ms = min(step_ms(args, threshold_rule) for _ in range(2))
            new_ms = min(step_ms(args, new) for _ in range(2))
            groups = new(args["query_start"], args["seq_lens"])
            shape = "one call" if groups is None else " + ".join(str(len(g)) for g in groups)
            print(f"| {name} | {old_ms:.1f} | {new_ms:.1f} | {shape} |", flush=True)
    finally:
        K.split_groups = new


if __name__ == "__main__":
    main()

"""Building one target step from scheduled sequences and their draft trees.

Per sequence the step's new tokens are its uncached tokens (a prompt or a chunk of it, a
recompute after preemption, or the single pending token) followed by its draft-tree nodes. Uncached
tokens attend causally; tree nodes see all of them plus their own ancestors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora.engine.sequence import Sequence
from aurora.engine.tree import DraftTree
from aurora.models.runner import StepBatch

TAIL_MIN_SKIP = 32     # rows without logits (prompt tokens before the root) from which the tail pays


@dataclass
class SeqRows:
    start: int          # first row of this sequence in the step's T tokens
    num_uncached: int   # m: causal tokens; row start + m - 1 is the root
    num_nodes: int      # tree nodes at rows start + m ...
    logit_start: int    # row in result.logits of the root; nodes follow


def build_step(seqs: list[Sequence], trees: list[DraftTree | None], block_size: int,
               device: torch.device, tail: bool = False) -> tuple[StepBatch, list[SeqRows]]:
    input_ids, positions, slots, logits_rows, rows = [], [], [], [], []
    masks = []
    seq_lens, query_start = [], [0]
    for seq, tree in zip(seqs, trees):
        m = seq.num_step_tokens
        nodes = len(tree) if tree is not None else 0
        start, base = len(input_ids), seq.num_cached
        rows.append(SeqRows(start, m, nodes, len(logits_rows)))
        input_ids += seq.token_ids[base:base + m]
        positions += range(base, base + m)
        if nodes:
            input_ids += tree.token_ids
            positions += [base + m - 1 + d for d in tree.depths]
        n = m + nodes
        bt = seq.block_ids
        slots += [bt[s // block_size] * block_size + s % block_size for s in range(base, base + n)]
        logits_rows += range(start + m - 1, start + n)
        mask = torch.ones(n, n, dtype=torch.bool).tril_()
        if nodes:
            mask[m:, m:] = tree.ancestor_mask()      # nodes see prefix-new tokens + ancestors
        masks.append(mask)
        seq_lens.append(base + n)
        query_start.append(query_start[-1] + n)
    tree_mask = _pack(masks, query_start)
    tail_start = tail_mask = None
    if tail and len(input_ids) - len(logits_rows) >= TAIL_MIN_SKIP:
        # each sequence's rows from its root on: root + nodes see every earlier row as cached
        tails = [mk[r.num_uncached - 1:, r.num_uncached - 1:] for mk, r in zip(masks, rows)]
        tail_qs = [0]
        for mk in tails:
            tail_qs.append(tail_qs[-1] + mk.shape[0])
        tail_start = torch.tensor(tail_qs, dtype=torch.int32, device=device)
        tail_mask = _pack(tails, tail_qs).to(device)
    max_blocks = max(len(s.block_ids) for s in seqs)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for i, s in enumerate(seqs):
        block_tables[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
    batch = StepBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
        tree_mask=tree_mask.to(device),
        logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
        tail_query_start=tail_start,
        tail_tree_mask=tail_mask,
    )
    return batch, rows


def _pack(masks: list[torch.Tensor], query_start: list[int]) -> torch.Tensor:
    """Per-sequence [n_i, n_i] masks -> [sum n_i, max n_i], rows packed by sequence (one sequence:
    its own mask, no copy: a long prompt's [T, T])."""
    if len(masks) == 1:
        return masks[0]
    out = torch.zeros(query_start[-1], max(mk.shape[0] for mk in masks), dtype=torch.bool)
    for mk, s in zip(masks, query_start):
        out[s:s + mk.shape[0], :mk.shape[1]] = mk
    return out

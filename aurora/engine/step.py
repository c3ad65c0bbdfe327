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


@dataclass
class SeqRows:
    start: int          # first row of this sequence in the step's T tokens
    num_uncached: int   # m: causal tokens; row start + m - 1 is the root
    num_nodes: int      # tree nodes at rows start + m ...
    logit_start: int    # row in result.logits of the root; nodes follow


def build_step(seqs: list[Sequence], trees: list[DraftTree | None], block_size: int,
               device: torch.device) -> tuple[StepBatch, list[SeqRows]]:
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
    if len(masks) == 1:                              # one sequence (a long prompt: no [T, T] copy)
        tree_mask = masks[0]
    else:
        tree_mask = torch.zeros(len(input_ids), max(mk.shape[0] for mk in masks), dtype=torch.bool)
        for mk, s in zip(masks, query_start):
            tree_mask[s:s + mk.shape[0], :mk.shape[1]] = mk
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
    )
    return batch, rows

"""Composed proposers: one tree merging several drafts' candidates (e.g. eagle+ngram),
so a learned draft never loses the cases where copying from context wins. Shared
prefixes are merged under greedy; under sampling siblings stay separate draws."""
from __future__ import annotations

from aurora.drafts.base import Proposer


class ComposedProposer(Proposer):
    def __init__(self, parts: list[Proposer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.learnable = any(p.learnable for p in parts)

    @property
    def version(self) -> int:
        return max(p.version for p in self.parts)

    @property
    def learned(self):
        return next((p for p in self.parts if p.learnable), None)

    def propose(self, seqs, ctx):
        trees = self.parts[0].propose(seqs, ctx)
        for part in self.parts[1:]:
            extra = part.propose(seqs, ctx)
            for seq, tree, other in zip(seqs, trees, extra):
                budget = ctx.spec.max_nodes + ctx.spec.depth   # room for one extra chain
                tree.merge(other, dedupe=seq.params.greedy, max_nodes=budget)
        return trees

    def on_step(self, seqs, batch, result, rows):
        for p in self.parts:
            p.on_step(seqs, batch, result, rows)

    def release(self, seq):
        for p in self.parts:
            p.release(seq)

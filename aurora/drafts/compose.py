"""Composed proposers: one tree merging several drafts' candidates (e.g. eagle+ngram),
so a learned draft never loses the cases where copying from context wins. Shared
prefixes are merged under greedy; under sampling siblings stay separate draws.

Gate: a learned draft's branch costs verify compute. Its *gain* is the number of accepted
tokens only it proposed; while the running mean gain is below `MIN_GAIN` the learned branch
is proposed on every `EXPLORE_EVERY`-th step only (to keep measuring it as it trains)."""
from __future__ import annotations

from aurora.drafts.base import Proposer
from aurora.engine.tree import DraftTree

MIN_GAIN = 0.08          # accepted learned-only tokens per step worth the extra nodes
EXPLORE_EVERY = 4
GAIN_DECAY = 0.98


class ComposedProposer(Proposer):
    def __init__(self, parts: list[Proposer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.learnable = any(p.learnable for p in parts)
        self.gain = MIN_GAIN        # running mean of learned-only accepted tokens per step
        self.num_steps = 0
        self.gate_open = True
        self._learned_only: dict[int, set[int]] = {}   # id(tree) -> nodes only the learned draft proposed

    @property
    def version(self) -> int:
        return max(p.version for p in self.parts)

    @property
    def learned(self):
        return next((p for p in self.parts if p.learnable), None)

    def propose(self, seqs, ctx):
        self.num_steps += 1
        use_learned = self.gain >= MIN_GAIN or self.num_steps % EXPLORE_EVERY == 0
        self.gate_open = use_learned
        parts = [p for p in self.parts if use_learned or not p.learnable] or self.parts[:1]
        trees = parts[0].propose(seqs, ctx)
        learned_base = parts[0].learnable
        self._learned_only = {}
        for part in parts[1:]:
            extra = part.propose(seqs, ctx)
            for seq, tree, other in zip(seqs, trees, extra):
                budget = ctx.spec.max_nodes + ctx.spec.depth   # room for one extra chain
                n_before = len(tree)
                shared = tree.merge(other, dedupe=seq.params.greedy, max_nodes=budget)
                if learned_base:
                    self._learned_only[id(tree)] = set(range(n_before)) - shared
        return trees

    def on_step(self, seqs, batch, result, rows):
        for p in self.parts:
            p.on_step(seqs, batch, result, rows)

    def observe(self, trees: list[DraftTree | None], outcomes) -> None:
        """Update the learned branch's gain from this step's accepted paths."""
        for tree, (path, _) in zip(trees, outcomes):
            only = self._learned_only.get(id(tree)) if tree is not None else None
            if only is not None:
                gain = sum(1 for n in path if n in only)
                self.gain = GAIN_DECAY * self.gain + (1 - GAIN_DECAY) * gain

    def release(self, seq):
        for p in self.parts:
            p.release(seq)

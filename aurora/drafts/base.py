"""The `Proposer` interface and the per-step context the engine hands it."""
from __future__ import annotations

from dataclasses import dataclass

from aurora.config import SpecConfig
from aurora.engine.sequence import Sequence
from aurora.engine.tree import DraftTree


@dataclass
class ProposeContext:
    spec: SpecConfig          # tree shape for this step (the policy may shrink it)
    vocab_size: int           # target vocabulary (q_probs width)


class Proposer:
    """Propose one draft tree per sequence. Sequences given are in decode phase: their
    last token is pending (no KV yet) and is the tree root."""
    name = "base"
    version = 0               # draft weights version (learned drafts bump it on swap)
    learnable = False

    def propose(self, seqs: list[Sequence], ctx: ProposeContext) -> list[DraftTree]:
        raise NotImplementedError

    def on_step(self, seqs, batch, result, rows) -> None:
        """Called after every target forward (drafts that keep per-sequence state use it)."""

    def observe(self, trees, outcomes) -> None:
        """Called with each step's trees and (accepted path, bonus) outcomes."""

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (finished or preempted)."""


class NoProposer(Proposer):
    name = "none"

    def propose(self, seqs, ctx):
        return [DraftTree() for _ in seqs]

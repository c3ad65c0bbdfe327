"""Prompt lookup: propose the continuation of the latest earlier match of the context's
suffix (longest n-gram first). Deterministic proposals (point masses), no weights."""
from __future__ import annotations

from aurora.drafts.base import Proposer
from aurora.engine.tree import DraftTree


def lookup(tokens: list[int], depth: int, n_max: int, n_min: int) -> list[int]:
    """Continuation (up to `depth` tokens) after the most recent earlier occurrence of
    the longest suffix of length n_max..n_min."""
    return lookup_match(tokens, depth, n_max, n_min)[0]


def lookup_match(tokens: list[int], depth: int, n_max: int, n_min: int) -> tuple[list[int], int]:
    """`lookup`'s continuation and the length n of the suffix it matched (0: none)."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + depth], n
    return [], 0


class NgramProposer(Proposer):
    name = "ngram"

    def propose(self, seqs, ctx):
        spec = ctx.spec
        trees = []
        for seq in seqs:
            window = seq.token_ids[-1024:]
            cont, n = lookup_match(window, min(spec.ngram_depth or spec.depth, spec.max_nodes), spec.ngram_max,
                                   spec.ngram_min)
            tree = DraftTree.chain(cont, source=f"ng:m{n}")
            tree.match_len = n if cont else 0
            trees.append(tree)
        return trees

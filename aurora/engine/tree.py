"""Draft trees: a flat list of nodes (token, parent, depth, draft logprob).

Node parents precede children (topological order). Parent -1 means the root: the
sequence's pending last token, whose target logits score the depth-1 nodes.
`q_rows[i]` indexes the processed draft distribution node i was drawn from
(`q_probs`), or is -1 when the proposal was deterministic (a point mass on the token).
`sources[i]` says what proposed node i and on what evidence ("" when nothing finer than its
q row is known), e.g. "sfx:m8:s2" (suffix memory, 8 context tokens matched, 2-3 earlier
occurrences behind this path) or "ng:m3" (prompt lookup, 3-token match); the adaptive policy
keeps its acceptance statistics per source (engine/policy.py). A node two drafts proposed
alike is marked "agree".
Children are indexed as nodes are added, so child lookups are O(1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    q_rows: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    q_probs: torch.Tensor | None = None          # [num_dists, vocab] float32 (CPU)
    draft_version: int = 0
    match_len: int = 0        # context tokens a lookup draft matched to propose it (0: no lookup match)
    learned: set[int] = field(default_factory=set)   # nodes only a composed tree's learned draft proposed
    coverage: int = -1        # composed drafts: the learned branch's accounting group (-1: it did not run)
    _kids: dict = field(default_factory=dict, repr=False, compare=False)     # parent -> [child]
    _by_token: dict = field(default_factory=dict, repr=False, compare=False)  # (parent, token) -> first child

    def __post_init__(self):
        self.sources += [""] * (len(self.token_ids) - len(self.sources))
        for i, (p, t) in enumerate(zip(self.parents, self.token_ids)):
            self._index(i, p, t)

    def _index(self, node: int, parent: int, token_id: int) -> None:
        self._kids.setdefault(parent, []).append(node)
        self._by_token.setdefault((parent, token_id), node)

    def __len__(self) -> int:
        return len(self.token_ids)

    def add(self, token_id: int, parent: int, logprob: float = 0.0, q_row: int = -1, source: str = "") -> int:
        depth = 1 if parent < 0 else self.depths[parent] + 1
        self.token_ids.append(int(token_id))
        self.parents.append(int(parent))
        self.depths.append(depth)
        self.logprobs.append(float(logprob))
        self.q_rows.append(int(q_row))
        self.sources.append(source)
        node = len(self.token_ids) - 1
        self._index(node, int(parent), int(token_id))
        return node

    def children(self, node: int) -> list[int]:
        return list(self._kids.get(node, ()))

    def find_child(self, parent: int, token_id: int) -> int:
        """First child of `parent` proposing `token_id`, or -1."""
        return self._by_token.get((parent, token_id), -1)

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: node i sees node j iff j is i or an ancestor of i."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            mask[i, i] = True
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def max_depth(self) -> int:
        return max(self.depths, default=0)

    @staticmethod
    def chain(token_ids: list[int], source: str = "") -> "DraftTree":
        tree = DraftTree()
        parent = -1
        for t in token_ids:
            parent = tree.add(t, parent, source=source)
        return tree

    def merge(self, other: "DraftTree", dedupe: bool, max_nodes: int, max_depth: int = 1 << 30) -> set[int]:
        """Graft `other`'s nodes up to `max_depth` into this tree (shared prefixes merged when
        `dedupe`). Returns the indices of this tree's nodes that `other` also proposed."""
        shared: set[int] = set()
        remap: dict[int, int] = {}
        q_offset = 0
        if len(other):
            self.match_len = max(self.match_len, other.match_len)
        if other.q_probs is not None:
            if self.q_probs is None:
                self.q_probs = other.q_probs
            else:
                q_offset = self.q_probs.shape[0]
                self.q_probs = torch.cat([self.q_probs, other.q_probs])
        for i, tok in enumerate(other.token_ids):
            parent = remap.get(other.parents[i], -1) if other.parents[i] >= 0 else -1
            if (other.parents[i] >= 0 and other.parents[i] not in remap) or other.depths[i] > max_depth:
                continue                                  # too deep, or its parent was dropped
            existing = self.find_child(parent, tok) if dedupe else -1
            if existing >= 0:
                remap[i] = existing
                shared.add(existing)
                if self.sources[existing] and other.sources[i] and self.sources[existing] != other.sources[i]:
                    self.sources[existing] = "agree"      # two drafts' evidence behind one node
            elif len(self) < max_nodes:
                q_row = other.q_rows[i] + q_offset if other.q_rows[i] >= 0 else -1
                remap[i] = self.add(tok, parent, other.logprobs[i], q_row, other.sources[i])
        return shared

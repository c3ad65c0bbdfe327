"""`suffix`: a draft that remembers all traffic. Every token of every request served (prompt
and output, finished and in flight) goes into one bounded `SuffixIndex`; a sequence's draft is
the frequency-ranked tree of what followed its current context anywhere in that memory.

Visibility: tokens are indexed when the engine hands the sequence over (on_step after each
target forward, propose before drafting, release when it ends), so what one request commits is
visible to every request at the next step. Greedy, and sampling with `suffix_q="point"`: the
frequency-ranked tree as point masses (q_rows -1), lossless under recursive rejection. Sampling
with `suffix_q="frequency"`: q at a node is the frequency of each continuation, children are
i.i.d. draws from it, and verification accepts x w.p. min(1, p(x)/q(x)).
Persistence (`save`/`load`, `draft="suffix:<dir>"`) writes user text (token ids) to disk;
`SpecConfig.suffix_persist=False` turns it off.
"""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import torch

from aurora.config import SpecConfig
from aurora.drafts.base import Proposer
from aurora.drafts.suffix_index import Cursor, SuffixIndex
from aurora.engine.tree import DraftTree

log = logging.getLogger("aurora.drafts.suffix")


class SuffixProposer(Proposer):
    name = "suffix"

    def __init__(self, spec: SpecConfig | None = None, path: str | None = None):
        self.spec = spec or SpecConfig()
        self.path = path
        self.lock = threading.Lock()                 # save() runs off the engine thread
        if path and SuffixIndex.exists(path):
            self.index = SuffixIndex.load(path)
            log.info("suffix index loaded from %s: %d tokens", path, self.index.num_tokens)
        else:
            self.index = SuffixIndex(self.spec.suffix_bytes)
        self._cursors: dict[int, tuple[object, Cursor]] = {}   # id(seq) -> (seq, its write cursor)

    # ---------------------------------------------------------------- indexing
    def _sync(self, seq) -> Cursor:
        """Index the sequence's tokens not indexed yet (all of token_ids are final)."""
        entry = self._cursors.get(id(seq))
        if entry is None:
            entry = (seq, self.index.open())
            self._cursors[id(seq)] = entry
        cur = entry[1]
        ids = seq.token_ids
        if cur.num_tokens < len(ids):
            self.index.extend(cur, ids[cur.num_tokens:])
        return cur

    def on_step(self, seqs, batch, result, rows) -> None:
        with self.lock:
            for seq in seqs:
                self._sync(seq)

    def release(self, seq) -> None:
        with self.lock:
            if id(seq) in self._cursors:
                self._sync(seq)
                del self._cursors[id(seq)]

    # ---------------------------------------------------------------- drafting
    def propose(self, seqs, ctx):
        spec = ctx.spec
        with self.lock:
            cursors = [self._sync(seq) for seq in seqs]      # everyone's newest tokens first
            trees = []
            max_depth = min(self.spec.suffix_max_depth, spec.max_nodes)
            for seq, cur in zip(seqs, cursors):
                if self.spec.suffix_q == "frequency" and not seq.params.greedy:
                    trees.append(self._sampled_tree(seq, cur, spec, max_depth, ctx.vocab_size))
                    continue
                tokens, parents, probs, length, supports = self.index.speculate(
                    cur, spec.max_nodes, max_depth, self.spec.suffix_min_prob, self.spec.suffix_spec_factor)
                tree = DraftTree(match_len=length if tokens else 0)
                for tok, parent, prob, support in zip(tokens, parents, probs, supports):
                    share = prob / probs[parent] if parent >= 0 else prob
                    tree.add(tok, parent, math.log(prob), source=suffix_source(length, support, share))
                trees.append(tree)
        return trees

    def _sampled_tree(self, seq, cur, spec, max_depth: int, vocab_size: int) -> DraftTree:
        tokens, parents, q_rows, dists = self.index.sample_tree(
            cur, spec.max_nodes, max_depth, self.spec.suffix_spec_factor, spec.width, seq.generator)
        tree = DraftTree()
        if not tokens:
            return tree
        q = torch.zeros(len(dists), vocab_size)                          # [rows, V] the frequency q
        for r, dist in enumerate(dists):
            toks, ps = zip(*dist)
            q[r, list(toks)] = torch.tensor(ps)
        for tok, parent, row in zip(tokens, parents, q_rows):
            tree.add(tok, parent, math.log(float(q[row, tok])), row, "sfx:q")
        tree.q_probs = q
        return tree

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path | None = None) -> str | None:
        """Write the index beside the draft checkpoint (None when persistence is off)."""
        if not self.spec.suffix_persist:
            return None
        path = path or self.path
        if path is None:
            raise ValueError("no directory to save the suffix index in")
        with self.lock:
            return str(self.index.save(path))

    def load(self, path: str | Path) -> None:
        if not self.spec.suffix_persist:
            raise ValueError("suffix index persistence is off (SpecConfig.suffix_persist=False)")
        index = SuffixIndex.load(path)
        with self.lock:
            self.index = index
            self._cursors.clear()

    def stats(self) -> dict:
        idx = self.index
        return {"tokens": idx.num_tokens, "bytes": idx.nbytes, "max_bytes": idx.max_bytes,
                "requests": idx.num_requests, "in_flight": len(self._cursors)}


def suffix_source(match_len: int, support: int, share: float) -> str:
    """A suffix node's evidence class for the adaptive policy's acceptance statistics: context
    tokens matched, earlier occurrences behind its path (1, 2-3, 4+), and whether it is a minor
    continuation (under half of its parent's occurrences)."""
    s = 1 if support < 2 else (2 if support < 4 else 4)
    return f"sfx:m{match_len}:s{s}" + (":minor" if share < 0.5 else "")


def find_suffix(proposer: Proposer) -> SuffixProposer | None:
    """The suffix part of a (possibly composed) proposer, if any."""
    if isinstance(proposer, SuffixProposer):
        return proposer
    return next((p for p in getattr(proposer, "parts", ()) if isinstance(p, SuffixProposer)), None)

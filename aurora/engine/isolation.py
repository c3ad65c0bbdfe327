"""Per-request isolation of drafting: a failing draft costs the sequence it failed for
its speculation, never another request's output (verification, not the draft, decides
tokens, so dropping a tree is always exact).

Levels: the configured proposer, then (for a composition holding a learned draft) the
composition of its non-learned parts, then no speculation. A batch proposal that raises is
retried per sequence; a sequence whose proposal raises (or yields an invalid tree: token
ids out of range, non-finite q) drops to the next level for the rest of its life. A level
that fails for `MAX_FAILED` of the last `WINDOW` distinct sequences it served is switched
off for everyone until the draft's weights change (a new swap gives it a fresh chance).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict

from aurora.drafts.base import Proposer
from aurora.engine.tree import DraftTree

log = logging.getLogger("aurora.engine")
MAX_FAILED = 4           # failing sequences ...
WINDOW = 16              # ... among the last WINDOW distinct sequences a level proposed for
LEVEL_KEY = "isolation_level"


class _Level:
    def __init__(self, proposer: Proposer):
        self.proposer = proposer
        self.off = False
        self.recent: OrderedDict[str, bool] = OrderedDict()   # request id -> failed

    def record(self, request_id: str, failed: bool) -> bool:
        """Note one sequence's outcome; True when this level must be switched off."""
        self.recent[request_id] = self.recent.get(request_id, False) or failed
        self.recent.move_to_end(request_id)
        while len(self.recent) > WINDOW:
            self.recent.popitem(last=False)
        return sum(self.recent.values()) >= MAX_FAILED


def fallback_of(proposer: Proposer) -> Proposer | None:
    """The proposer without its learned parts (None when nothing would be left)."""
    parts = getattr(proposer, "parts", None)
    if not parts or not proposer.learnable:
        return None
    rest = [p for p in parts if not p.learnable]
    if not rest:
        return None
    if len(rest) == 1:
        return rest[0]
    return type(proposer)(rest)


def valid_tree(tree, vocab_size: int) -> bool:
    if not isinstance(tree, DraftTree):
        return False
    if tree.token_ids and (min(tree.token_ids) < 0 or max(tree.token_ids) >= vocab_size):
        return False
    if tree.q_probs is not None:
        total = float(tree.q_probs.sum())       # NaN/inf anywhere makes the sum non-finite
        if not math.isfinite(total):
            return False
    return True


class ProposalIsolation:
    """Wraps the engine's proposer: `propose(seqs, ctx)` never raises."""

    def __init__(self, proposer: Proposer):
        self.proposer = proposer
        levels = [proposer]
        fallback = fallback_of(proposer)
        if fallback is not None:
            levels.append(fallback)
        self.levels = [_Level(p) for p in levels]
        self.num_failures = 0           # sequence proposals that failed (the sequence lost that draft)
        self.num_switch_offs = 0        # levels switched off for everyone
        self._version = proposer.version

    def propose(self, seqs, ctx) -> list[DraftTree | None]:
        if self.proposer.version != self._version:        # new weights: every level gets a fresh chance
            self._version = self.proposer.version
            for level in self.levels:
                level.off, level.recent = False, OrderedDict()
        trees: dict[int, DraftTree | None] = {}
        for index, level in enumerate(self.levels):
            group = [s for s in seqs if id(s) not in trees and self._level_of(s) <= index]
            if level.off or not group:
                continue
            for seq, tree in zip(group, self._run(level, group, ctx)):
                if tree is None:
                    seq.draft_state[LEVEL_KEY] = index + 1      # this sequence drops a level for good
                else:
                    trees[id(seq)] = tree
        return [trees.get(id(s)) for s in seqs]

    @staticmethod
    def _level_of(seq) -> int:
        return seq.draft_state.get(LEVEL_KEY, 0)

    def _run(self, level: _Level, group, ctx) -> list[DraftTree | None]:
        """Trees for `group` (None where that sequence's proposal failed)."""
        try:
            trees = level.proposer.propose(group, ctx)
            if len(trees) != len(group):
                raise ValueError(f"proposer returned {len(trees)} trees for {len(group)} sequences")
        except Exception:
            if len(group) > 1:
                trees = None
            else:
                trees = [None]
                log.exception("draft %s failed for %s", level.proposer.name, group[0].request_id)
        if trees is None:                                   # find who it fails for: one at a time
            return [self._run(level, [seq], ctx)[0] for seq in group]   # (each run records its outcome)
        out = []
        for seq, tree in zip(group, trees):
            ok = tree is not None and valid_tree(tree, ctx.vocab_size)
            if tree is not None and not ok:
                log.warning("draft %s proposed an invalid tree for %s", level.proposer.name, seq.request_id)
            out.append(tree if ok else None)
            self.num_failures += not ok
            if level.record(seq.request_id, not ok) and not level.off:
                level.off = True
                self.num_switch_offs += 1
                log.error("draft %s failed for %d of the last %d sequences; switched off until its weights "
                          "change", level.proposer.name, MAX_FAILED, WINDOW)
        return out

    def stats(self) -> dict:
        return {
            "draft_failures": self.num_failures,
            "draft_switch_offs": self.num_switch_offs,
            "draft_off": [lv.proposer.name for lv in self.levels if lv.off],
            "learned_draft_off": any(lv.off and lv.proposer.learnable for lv in self.levels),
        }

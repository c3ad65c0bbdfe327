"""Pack trace windows into training rows, level by level, with a tree-ancestor visibility mask.

Several windows (of one or many records) share one packed batch; each is a segment that
never sees another. Level 1: context rows (target features, teacher forcing). Level
L >= 2: the draft's own previous output as feature (EAGLE-3 training-time test), along the
committed sequence ("chain" rows) and at first-rejected tree nodes (counterfactual
prefixes). Row (segment s, level L, position i) sees level-1 rows of s at positions
<= i - L + 1, chain rows of s of level j in [2, L) at position i - L + j, and itself —
exactly what a depth-(L-1) node sees when the engine drafts. A row's target is the stored
target distribution at position i + 1 (chain) or at the rejected node (tree rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Level:
    pos: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    tok: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)       # global row of the parent (feature source); -1 at level 1
    target: list[int] = field(default_factory=list)       # row into the packed target tensors; -1: no loss
    chain: list[bool] = field(default_factory=list)       # chain rows are visible to deeper rows; tree rows are not
    discard_tok: list[int] = field(default_factory=list)  # tree rows: the rejected token (discard at the parent); -1

    def add(self, pos, seg, tok, parent, target, chain, discard_tok) -> None:
        self.pos.append(pos); self.seg.append(seg); self.tok.append(tok); self.parent.append(parent)
        self.target.append(target); self.chain.append(chain); self.discard_tok.append(discard_tok)


@dataclass
class Packed:
    levels: list[Level]
    features: torch.Tensor      # [n1, 3h] level-1 features (stored dtype)
    target_ids: torch.Tensor    # [D, K] int64 target top-k ids (-1 padding)
    target_probs: torch.Tensor  # [D, K] float32
    target_hard: torch.Tensor   # [D] bool: a hard label from the prompt (TraceRecord.label_only), not the target

    @property
    def num_rows(self) -> int:
        return sum(len(lv.pos) for lv in self.levels)

    @property
    def num_loss_rows(self) -> int:
        return sum(t >= 0 for lv in self.levels for t in lv.target)


def pack(windows: list[tuple], unroll: int) -> Packed:
    """windows: (record, start, end) -> rows for window positions [start, end) of each record."""
    levels = [Level()]
    tids, tprobs, thard, feats = [], [], [], []
    row_of: dict[tuple[int, int, int], int] = {}      # (seg, level, pos) -> global row of a chain row
    dist_row: list[dict[int, int]] = []               # per seg: position -> target row
    n_targets = 0
    for s, (rec, start, end) in enumerate(windows):
        end = min(end, len(rec.features))
        has = rec.has_target.tolist()
        rows = {}
        for i in range(start, end):
            j = i + 1                                     # row i predicts token i + 2 from p at i + 1
            if j < end and has[j]:
                rows[i] = n_targets
                n_targets += 1
        idx = torch.tensor([i + 1 for i in rows], dtype=torch.long)
        tids.append(rec.target_ids[idx]); tprobs.append(rec.target_probs[idx])
        thard.append(rec.label_only[idx] if rec.label_only is not None else torch.zeros(len(idx), dtype=torch.bool))
        dist_row.append(rows)
        feats.append(rec.features[start:end])
        toks = rec.token_ids
        for i in range(start, end):
            row_of[(s, 1, i)] = len(levels[0].pos)
            levels[0].add(i, s, toks[i + 1], -1, rows.get(i, -1), True, -1)
    offset = len(levels[0].pos)
    rej_by_level: dict[int, list] = {}
    for s, (rec, start, end) in enumerate(windows):
        for j, (depth, pos, tok) in enumerate(rec.rejected):
            if depth < unroll + 1 and start <= pos - 1 and pos < min(end, len(rec.features)):
                rej_by_level.setdefault(depth + 1, []).append((s, pos, tok, rec, j))
    for L in range(2, unroll + 2):
        lv = Level()
        if L <= unroll:
            for s, (rec, start, end) in enumerate(windows):
                rows = dist_row[s]
                for i in range(start + L - 1, min(end, len(rec.features))):
                    parent = row_of.get((s, L - 1, i - 1))
                    if parent is None or i not in rows:
                        continue
                    lv.add(i, s, rec.token_ids[i + 1], parent, rows[i], True, -1)
        for s, pos, tok, rec, j in rej_by_level.get(L, []):
            parent = row_of.get((s, L - 1, pos - 1))
            if parent is None:
                continue
            lv.add(pos, s, tok, parent, n_targets, False, tok)
            tids.append(rec.rejected_ids[j:j + 1]); tprobs.append(rec.rejected_probs[j:j + 1])
            thard.append(torch.zeros(1, dtype=torch.bool))
            n_targets += 1
        if not lv.pos:
            break
        for k, (s, p, c) in enumerate(zip(lv.seg, lv.pos, lv.chain)):
            if c:
                row_of[(s, L, p)] = offset + k
        offset += len(lv.pos)
        levels.append(lv)
    return Packed(levels, torch.cat(feats), torch.cat(tids).long(), torch.cat(tprobs).float(), torch.cat(thard))


def visibility(levels: list[Level], upto: int, device) -> torch.Tensor:
    """[rows of level `upto`, rows of levels 1..upto] bool, per the module rule."""
    pos = torch.tensor([p for lv in levels[:upto + 1] for p in lv.pos], device=device)
    seg = torch.tensor([s for lv in levels[:upto + 1] for s in lv.seg], device=device)
    lvl = torch.tensor([i + 1 for i, lv in enumerate(levels[:upto + 1]) for _ in lv.pos], device=device)
    chain = torch.tensor([c for lv in levels[:upto + 1] for c in lv.chain], device=device)
    n_new = len(levels[upto].pos)
    q_pos, q_seg, q_lvl = pos[-n_new:, None], seg[-n_new:, None], upto + 1
    vis = (lvl[None] == 1) & (pos[None] <= q_pos - q_lvl + 1)
    vis |= chain[None] & (lvl[None] >= 2) & (lvl[None] < q_lvl) & (pos[None] == q_pos - q_lvl + lvl[None])
    vis &= seg[None] == q_seg
    vis[:, -n_new:] |= torch.eye(n_new, dtype=torch.bool, device=device)
    return vis

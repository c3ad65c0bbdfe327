"""Pack one trace into training rows, level by level, with a tree-ancestor visibility mask.

Level 1: context rows (target features, teacher forcing). Level L >= 2: the draft's own
previous output as feature (EAGLE-3 training-time test), both along the accepted
sequence ("chain" rows) and at first-rejected tree nodes (counterfactual prefixes).
Row r (level L, position i) sees level-1 rows at positions <= i - L + 1, chain rows of
level j in [2, L) at position i - L + j (its ancestors), and itself — exactly what a
depth-(L-1) node sees when the engine drafts, so one pass covers all branches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Level:
    pos: list[int]
    tok: list[int]
    parent: list[int]       # global row of the parent (feature source); -1 for level 1
    target: list[int]       # row into the packed target-hidden tensor
    chain: list[bool]       # chain rows are visible to deeper rows; tree rows are not
    discard_tok: list[int]  # for tree rows: the rejected token (discard term at the parent); -1


def pack(record, start: int, end: int, unroll: int, max_tree_depth: int) -> tuple[list[Level], torch.Tensor, torch.Tensor]:
    """Rows for positions [start, end) of `record`. Returns levels, level-1 features
    [n1, 3h] and target hidden [num_targets, h] (rows index into it)."""
    n = len(record.features)
    end = min(end, n - 1)
    toks = record.token_ids
    targets = [record.hidden[start + 1:end + 1]]     # target of position i is hidden[i + 1]
    base = 0                                         # target row of position i: i - start
    levels = [Level(list(range(start, end)), [toks[i + 1] for i in range(start, end)], [-1] * (end - start),
                    list(range(end - start)), [True] * (end - start), [-1] * (end - start))]
    row_of = {(1, i): k for k, i in enumerate(range(start, end))}
    offset = end - start
    rej_rows = {}
    if record.rejected_hidden is not None:
        for j, (depth, pos, tok) in enumerate(record.rejected):
            if depth <= max_tree_depth:
                rej_rows.setdefault(depth + 1, []).append((pos, tok, j))
    rej_targets = []
    for L in range(2, max(unroll, max(rej_rows, default=1)) + 1):
        lv = Level([], [], [], [], [], [])
        if L <= unroll:
            for i in range(start + L - 1, end):
                parent = row_of.get((L - 1, i - 1))
                if parent is None:
                    continue
                lv.pos.append(i); lv.tok.append(toks[i + 1]); lv.parent.append(parent)
                lv.target.append(base + i - start); lv.chain.append(True); lv.discard_tok.append(-1)
        for pos, tok, j in rej_rows.get(L, []):
            parent = row_of.get((L - 1, pos - 1))
            if parent is None:
                continue
            lv.pos.append(pos); lv.tok.append(tok); lv.parent.append(parent)
            lv.target.append(-1 - len(rej_targets)); lv.chain.append(False); lv.discard_tok.append(tok)
            rej_targets.append(j)
        if not lv.pos:
            break
        for k, (p, c) in enumerate(zip(lv.pos, lv.chain)):
            if c:
                row_of[(L, p)] = offset + k
        offset += len(lv.pos)
        levels.append(lv)
    n_ctx = end - start
    if rej_targets:
        targets.append(record.rejected_hidden[torch.tensor(rej_targets)])
    for lv in levels:                                # negative ids -> rows after the context targets
        lv.target = [t if t >= 0 else n_ctx + (-1 - t) for t in lv.target]
    feats = record.features[start:end]
    return levels, feats, torch.cat(targets)


def visibility(levels: list[Level], upto: int, device) -> torch.Tensor:
    """[rows of level `upto`, rows of levels 1..upto] bool, per the module rule."""
    pos = torch.tensor([p for lv in levels[:upto + 1] for p in lv.pos], device=device)
    lvl = torch.tensor([i + 1 for i, lv in enumerate(levels[:upto + 1]) for _ in lv.pos], device=device)
    chain = torch.tensor([c for lv in levels[:upto + 1] for c in lv.chain], device=device)
    n_new = len(levels[upto].pos)
    q_pos, q_lvl = pos[-n_new:, None], upto + 1
    vis = (lvl[None] == 1) & (pos[None] <= q_pos - q_lvl + 1)
    vis |= chain[None] & (lvl[None] >= 2) & (lvl[None] < q_lvl) & (pos[None] == q_pos - q_lvl + lvl[None])
    vis[:, -n_new:] |= torch.eye(n_new, dtype=torch.bool, device=device)
    return vis
